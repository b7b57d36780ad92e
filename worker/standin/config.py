"""Run-time knobs of the rerank stand-in: keys, their rate limits, latency and fault probabilities."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from worker.standin import usage_shapes
from worker.standin.scoring import DEFAULT_IMAGE_TOKENS

_PROBABILITY_FIELDS = ("fault_429", "fault_5xx", "fault_drop", "fault_slow")
_DURATION_FIELDS = (
    "latency_ms",
    "latency_jitter_ms",
    "slow_ms",
    "retry_after_s",
    "pause_grace_ms",
    "token_factor",
)
_LIMIT_FIELDS = ("rpm", "tpm")


@dataclass(frozen=True)
class StandinConfig:
    """Frozen so a running server swaps a whole validated config, never sees half an update."""

    keys: dict[str, str]
    latency_ms: float = 0
    latency_jitter_ms: float = 0
    fault_429: float = 0
    fault_5xx: float = 0
    fault_drop: float = 0
    fault_slow: float = 0
    slow_ms: float = 30000
    retry_after_s: float = 1
    # A client needs a moment to learn of a 429 (the answer's trip back, then telling its
    # other workers): calls arriving within this grace are not counted as inside the pause.
    pause_grace_ms: float = 0
    max_documents: int = 2048
    seed: int = 0
    image_tokens: int = DEFAULT_IMAGE_TOKENS
    # Per key NAME: most calls admitted (`rpm`) and tokens billed (`tpm`) in any sliding
    # window of `window_s`; a call beyond either is refused with a 429, with a Retry-After
    # (until the window has room) or, as some providers do, without one.
    rpm: dict[str, int] = field(default_factory=dict)
    tpm: dict[str, int] = field(default_factory=dict)
    window_s: float = 60
    rate_limit_retry_after: bool = True
    # Tokens billed are the stand-in's own count times this (a provider counting otherwise).
    token_factor: float = 1

    # model -> how its answers carry usage (usage_shapes.SHAPES), over the default table.
    usage_shapes: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_keys(self.keys)
        _check_usage_shapes(self.usage_shapes)
        for name in _LIMIT_FIELDS:
            _check_limits(name, getattr(self, name), self.keys)
        if _number(self, "window_s") <= 0:
            raise ValueError("window_s must be > 0")
        if not isinstance(self.rate_limit_retry_after, bool):
            raise ValueError("rate_limit_retry_after must be a boolean")
        for name in _PROBABILITY_FIELDS:
            value = _number(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
        for name in _DURATION_FIELDS:
            if _number(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        for name, minimum in (("max_documents", 1), ("image_tokens", 0), ("seed", 0)):
            value = getattr(self, name)
            if not _is_int(value) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}")

    def with_changes(self, **fields: Any) -> StandinConfig:
        """Validated copy; unknown field names are a ValueError so admin callers get a 400."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"unknown config fields: {', '.join(unknown)}")
        return dataclasses.replace(self, **fields)


def parse_keys(spec: str) -> dict[str, str]:
    """Read RERANK_API_KEYS syntax (`NAME=SECRET[@N],...` or its JSON array); errors never
    quote a secret."""
    if spec.lstrip().startswith("["):
        return {name: secret for name, secret, _ in _json_keys(spec)}
    keys: dict[str, str] = {}
    for position, entry in enumerate((e.strip() for e in spec.split(",")), start=1):
        if not entry:
            continue
        name, sep, secret = entry.partition("=")
        name = name.strip()
        head, at, tail = secret.rpartition("@")
        if at and tail.isdigit():
            secret = head
        if not sep or not name or not secret:
            raise ValueError(f"key entry {position}: expected NAME=SECRET or NAME=SECRET@N")
        if name in keys:
            raise ValueError(f"key '{name}' is given twice")
        keys[name] = secret
    return keys


def key_limits(spec: str, what: str) -> dict[str, int]:
    """The `what` fields (rpm or tpm) of a JSON key array; none in the short form."""
    if not spec.lstrip().startswith("["):
        return {}
    return {name: fields[what] for name, _, fields in _json_keys(spec) if fields.get(what)}


def parse_limits(spec: str, what: str) -> dict[str, int]:
    """`NAME=N,...`, as --rpm and --tpm take them."""
    limits: dict[str, int] = {}
    for entry in (e.strip() for e in spec.split(",")):
        if not entry:
            continue
        name, sep, value = entry.partition("=")
        if not sep or not name.strip() or not value.strip().isdigit():
            raise ValueError(f"{what} entry '{entry}': expected NAME=N")
        limits[name.strip()] = int(value)
    return limits


def _json_keys(spec: str) -> list[tuple[str, str, dict[str, Any]]]:
    try:
        entries = json.loads(spec)
    except json.JSONDecodeError as exc:
        raise ValueError(f"keys: not valid JSON ({exc.msg}, column {exc.colno})") from None
    found = []
    for position, entry in enumerate(entries if isinstance(entries, list) else [None], 1):
        name = entry.get("name") if isinstance(entry, dict) else None
        secret = entry.get("secret") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name or not isinstance(secret, str) or not secret:
            raise ValueError(f"key entry {position}: expected an object with name and secret")
        found.append((name, secret, entry))
    return found


def _check_limits(what: str, limits: object, keys: dict[str, str]) -> None:
    if not isinstance(limits, dict):
        raise ValueError(f"{what} must be a mapping of key name to a whole number")
    for name, value in limits.items():
        if name not in keys:
            raise ValueError(f"{what}: no key named '{name}'")
        if not _is_int(value) or value < 1:
            raise ValueError(f"{what} of key '{name}' must be a whole number >= 1")


def _check_keys(keys: object) -> None:
    if not isinstance(keys, dict):
        raise ValueError("keys must be a mapping of name to secret")
    for name, secret in keys.items():
        if not isinstance(name, str) or not name:
            raise ValueError("key names must be non-empty strings")
        if not isinstance(secret, str) or not secret:
            raise ValueError(f"key '{name}': secret must be a non-empty string")
    if len(set(keys.values())) != len(keys):
        raise ValueError("two key names share one secret")


def _check_usage_shapes(shapes: object) -> None:
    if not isinstance(shapes, dict):
        raise ValueError("usage_shapes must be a mapping of model to shape")
    for model, shape in shapes.items():
        if not isinstance(model, str) or shape not in usage_shapes.SHAPES:
            raise ValueError(
                f"usage_shapes: model {model!r} needs one of {', '.join(sorted(usage_shapes.SHAPES))}"
            )


def _number(config: StandinConfig, name: str) -> float:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number")
    return float(value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
