"""Typed settings from RERANK_* environment variables (and an optional .env file)."""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker import constants, errors
from worker.webhooks.schedule import RetrySchedule
from worker.webhooks.signing import is_webhook_secret


@dataclass(frozen=True)
class ApiKey:
    """One upstream key. Only `name` is ever shown, logged or stored.

    `rpm` / `tpm`: most calls / tokens in any rate window; `daily_tokens` / `monthly_tokens`:
    most tokens billed in a UTC day / month. None: no such limit.
    """

    name: str
    secret: SecretStr
    max_concurrency: int
    rpm: int | None = None
    tpm: int | None = None
    daily_tokens: int | None = None
    monthly_tokens: int | None = None

    def __repr__(self) -> str:
        limits = "".join(
            f", {field}={value}"
            for field in LIMIT_FIELDS
            if (value := getattr(self, field)) is not None
        )
        return f"ApiKey(name={self.name!r}, max_concurrency={self.max_concurrency}{limits})"

    @property
    def has_quota(self) -> bool:
        return self.daily_tokens is not None or self.monthly_tokens is not None


LIMIT_FIELDS = ("rpm", "tpm", "daily_tokens", "monthly_tokens")
_JSON_FIELDS = ("name", "secret", "concurrency", *LIMIT_FIELDS)


def parse_api_keys(raw: str, default_concurrency: int) -> tuple[ApiKey, ...]:
    """Parse a JSON array of key objects, or the short form `NAME=SECRET[@N],...`.

    Errors name the entry by position and NAME, and the field, never the secret.
    """
    if raw.lstrip().startswith("["):
        keys = _parse_json_keys(raw, default_concurrency)
    else:
        keys = _parse_short_keys(raw, default_concurrency)
    names = [k.name for k in keys]
    for name in names:
        if names.count(name) > 1:
            raise errors.ConfigError(f"RERANK_API_KEYS key '{name}' is given twice")
    return tuple(keys)


def _parse_short_keys(raw: str, default_concurrency: int) -> list[ApiKey]:
    keys: list[ApiKey] = []
    for position, entry in enumerate((e.strip() for e in raw.split(",")), start=1):
        if not entry:
            continue
        name, sep, rest = entry.partition("=")
        name = name.strip()
        if not sep or not name or not rest:
            raise errors.ConfigError(
                f"RERANK_API_KEYS entry {position}: expected NAME=SECRET or NAME=SECRET@N"
            )
        secret, limit = rest, default_concurrency
        head, at, tail = rest.rpartition("@")
        if at and tail.isdigit():
            secret, limit = head, int(tail)
        if limit < 1:
            raise errors.ConfigError(f"RERANK_API_KEYS key '{name}': concurrency must be >= 1")
        keys.append(ApiKey(name=name, secret=SecretStr(secret), max_concurrency=limit))
    return keys


def _parse_json_keys(raw: str, default_concurrency: int) -> list[ApiKey]:
    try:
        entries = json.loads(raw)
    except json.JSONDecodeError as exc:
        # exc.msg and the position only: the text around it may hold a secret.
        raise errors.ConfigError(
            f"RERANK_API_KEYS is not valid JSON ({exc.msg} at line {exc.lineno}, "
            f"column {exc.colno})"
        ) from None
    if not isinstance(entries, list):
        raise errors.ConfigError("RERANK_API_KEYS: expected a JSON array of key objects")
    return [
        _json_key(entry, position, default_concurrency)
        for position, entry in enumerate(entries, start=1)
    ]


def _json_key(entry: object, position: int, default_concurrency: int) -> ApiKey:
    where = f"RERANK_API_KEYS entry {position}"
    if not isinstance(entry, dict):
        raise errors.ConfigError(f"{where}: expected an object with 'name' and 'secret'")
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        raise errors.ConfigError(f"{where}: field 'name' must be a non-empty string")
    where = f"{where} ('{name}')"
    unknown = sorted(set(entry) - set(_JSON_FIELDS))
    if unknown:
        raise errors.ConfigError(f"{where}: unknown field '{unknown[0]}'")
    secret = entry.get("secret")
    if not isinstance(secret, str) or not secret:
        raise errors.ConfigError(f"{where}: field 'secret' must be a non-empty string")

    def whole(field: str) -> int | None:
        value = entry.get(field)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise errors.ConfigError(f"{where}: field '{field}' must be a whole number >= 1")
        return value

    return ApiKey(
        name=name,
        secret=SecretStr(secret),
        max_concurrency=whole("concurrency") or default_concurrency,
        rpm=whole("rpm"),
        tpm=whole("tpm"),
        daily_tokens=whole("daily_tokens"),
        monthly_tokens=whole("monthly_tokens"),
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RERANK_", env_file=".env", extra="ignore")

    database_url: str | None = None
    redis_url: str | None = None
    # Celery's broker (redis:// or amqp://); default: redis_url. Limits stay in Redis.
    broker_url: str | None = None
    data_dir: Path = Path(constants.DEFAULT_DATA_DIR)
    api_base: str = constants.DEFAULT_API_BASE
    api_keys: SecretStr = SecretStr("")
    max_concurrency_per_key: int = Field(constants.DEFAULT_MAX_CONCURRENCY_PER_KEY, ge=1)
    max_documents_per_call: int | None = Field(None, ge=1)
    default_model: str = constants.DEFAULT_MODEL
    max_attempts: int = Field(constants.DEFAULT_MAX_ATTEMPTS, ge=1)
    # Caps on input (worker/ingest.py names them in its errors).
    max_line_bytes: int = Field(constants.DEFAULT_MAX_LINE_BYTES, ge=1)
    max_document_chars: int = Field(constants.DEFAULT_MAX_DOCUMENT_CHARS, ge=1)
    max_documents_per_request: int = Field(constants.DEFAULT_MAX_DOCUMENTS_PER_REQUEST, ge=1)
    max_query_chars: int = Field(constants.DEFAULT_MAX_QUERY_CHARS, ge=1)

    call_timeout_s: float = Field(constants.DEFAULT_CALL_TIMEOUT_S, gt=0)
    backoff_base_s: float = Field(constants.DEFAULT_BACKOFF_BASE_S, ge=0)
    backoff_cap_s: float = Field(constants.DEFAULT_BACKOFF_CAP_S, ge=0)
    request_lease_s: float = Field(constants.REQUEST_LEASE_S, gt=0)
    storing_lease_s: float = Field(constants.STORING_LEASE_S, gt=0)
    sweep_interval_s: float = Field(constants.SWEEP_INTERVAL_S, gt=0)
    dispatch_stale_s: float = Field(constants.DISPATCH_STALE_S, gt=0)
    # A call's latency assumed by `estimate` before any call was measured.
    estimate_call_latency_s: float = Field(constants.DEFAULT_ESTIMATE_CALL_LATENCY_S, gt=0)
    log_level: str = "INFO"
    # "text" (Celery's lines) or "json" (one object per line, see worker/logs.py).
    log_format: Literal["text", "json"] = "text"
    # Most slots one worker process takes at once (default: every key's). A worker that
    # runs several processes gives each a share, so they do not poll for one another's.
    process_slots: int | None = Field(None, ge=1)
    # The length of the window that keys' rpm / tpm count in. Providers count a minute;
    # only tests shrink it, so that a job at the limit takes seconds.
    rate_window_s: float = Field(constants.RATE_WINDOW_S, gt=0)

    # Completion notifications. A webhook URL resolving to a non-public address is refused
    # unless this allows it (tests, private networks).
    webhook_allow_private: bool = False
    webhook_max_attempts: int = Field(constants.DEFAULT_WEBHOOK_MAX_ATTEMPTS, ge=1)
    webhook_retry_schedule_s: str = constants.DEFAULT_WEBHOOK_RETRY_SCHEDULE_S
    # Signs the webhooks of jobs that belong to no tenant (the CLI's); `whsec_` + base64.
    webhook_secret: SecretStr | None = None
    webhook_timeout_s: float = Field(constants.WEBHOOK_TIMEOUT_S, gt=0)
    webhook_lease_s: float = Field(constants.WEBHOOK_LEASE_S, gt=0)
    webhook_poll_interval_s: float = Field(constants.WEBHOOK_POLL_INTERVAL_S, gt=0)

    # How long a synchronous rerank (POST /v1/rerank) waits for its job before it answers 504.
    sync_timeout_s: float = Field(constants.DEFAULT_SYNC_TIMEOUT_S, gt=0)

    @field_validator("api_base")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        return value.rstrip("/")

    @field_validator("webhook_retry_schedule_s")
    @classmethod
    def _check_schedule(cls, value: str) -> str:
        RetrySchedule.parse(value, max_attempts=1)
        return value

    @field_validator("webhook_secret")
    @classmethod
    def _check_webhook_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value():
            return None
        if value is not None and not is_webhook_secret(value.get_secret_value()):
            raise ValueError("RERANK_WEBHOOK_SECRET must be 'whsec_' followed by base64")
        return value

    @functools.cached_property
    def webhook_retry_schedule(self) -> RetrySchedule:
        return RetrySchedule.parse(self.webhook_retry_schedule_s, self.webhook_max_attempts)

    @functools.cached_property
    def keys(self) -> tuple[ApiKey, ...]:
        return parse_api_keys(self.api_keys.get_secret_value(), self.max_concurrency_per_key)

    def secrets(self) -> list[str]:
        """The upstream secrets, for masking them wherever text leaves the process."""
        return [k.secret.get_secret_value() for k in self.keys]

    @property
    def uses_real_api(self) -> bool:
        return self.api_base == constants.DEFAULT_API_BASE

    @property
    def total_slots(self) -> int:
        return sum(k.max_concurrency for k in self.keys)

    @property
    def slots_per_process(self) -> int:
        return min(self.total_slots, self.process_slots or self.total_slots)

    def resolved_data_dir(self) -> Path:
        return self.data_dir.expanduser().resolve()

    def sqlalchemy_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.resolved_data_dir() / 'rerank.db'}"

    def default_worker_concurrency(self) -> int:
        """Threads per worker process: enough batches in flight to fill its slots twice over."""
        per_task = constants.REQUESTS_PER_TASK[constants.QUEUE_BULK]
        return max(4, 2 * math.ceil(self.slots_per_process / per_task))

    def require_keys(self) -> None:
        """Fail early, and helpfully, when the real API is configured without a key."""
        if not self.keys:
            hint = (
                "no API key configured: set RERANK_API_KEYS=NAME=SECRET[@N],... "
                f"for {self.api_base}"
            )
            if self.uses_real_api:
                hint += "; to try rerank-worker without a key, run `rerank-worker demo`"
            raise errors.ConfigError(hint)


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
