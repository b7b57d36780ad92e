"""Typed settings from RERANK_* environment variables (and an optional .env file)."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker import constants, errors


@dataclass(frozen=True)
class ApiKey:
    """One upstream key. Only `name` is ever shown, logged or stored."""

    name: str
    secret: SecretStr
    max_concurrency: int

    def __repr__(self) -> str:
        return f"ApiKey(name={self.name!r}, max_concurrency={self.max_concurrency})"


def parse_api_keys(raw: str, default_concurrency: int) -> tuple[ApiKey, ...]:
    """Parse `NAME=SECRET[@N],...`. Errors name the entry by position and NAME, never the secret."""
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
        if any(k.name == name for k in keys):
            raise errors.ConfigError(f"RERANK_API_KEYS key '{name}' is given twice")
        keys.append(ApiKey(name=name, secret=SecretStr(secret), max_concurrency=limit))
    return tuple(keys)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RERANK_", env_file=".env", extra="ignore")

    database_url: str | None = None
    redis_url: str | None = None
    data_dir: Path = Path(constants.DEFAULT_DATA_DIR)
    api_base: str = constants.DEFAULT_API_BASE
    api_keys: SecretStr = SecretStr("")
    max_concurrency_per_key: int = Field(constants.DEFAULT_MAX_CONCURRENCY_PER_KEY, ge=1)
    max_documents_per_call: int | None = Field(None, ge=1)
    default_model: str = constants.DEFAULT_MODEL
    max_attempts: int = Field(constants.DEFAULT_MAX_ATTEMPTS, ge=1)

    call_timeout_s: float = Field(constants.DEFAULT_CALL_TIMEOUT_S, gt=0)
    backoff_base_s: float = Field(constants.DEFAULT_BACKOFF_BASE_S, ge=0)
    backoff_cap_s: float = Field(constants.DEFAULT_BACKOFF_CAP_S, ge=0)
    request_lease_s: float = Field(constants.REQUEST_LEASE_S, gt=0)
    sweep_interval_s: float = Field(constants.SWEEP_INTERVAL_S, gt=0)
    dispatch_stale_s: float = Field(constants.DISPATCH_STALE_S, gt=0)
    log_level: str = "INFO"
    # "text" (Celery's lines) or "json" (one object per line, see worker/logs.py).
    log_format: Literal["text", "json"] = "text"
    # Most slots one worker process takes at once (default: every key's). A worker that
    # runs several processes gives each a share, so they do not poll for one another's.
    process_slots: int | None = Field(None, ge=1)

    @field_validator("api_base")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        return value.rstrip("/")

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
