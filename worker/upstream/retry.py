"""Retry policy as pure functions: what to wait before the next attempt."""

from __future__ import annotations

import email.utils
import math
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass

from worker import constants


def parse_retry_after(headers: Mapping[str, str], now_s: float | None = None) -> float | None:
    """Seconds to wait from `retry-after-ms`, or `Retry-After` as seconds or an HTTP date."""
    raw_ms = headers.get("retry-after-ms")
    if raw_ms:
        seconds = _finite(raw_ms)
        if seconds is not None:
            return max(0.0, seconds / 1000)
    raw = headers.get("retry-after")
    if not raw:
        return None
    seconds = _finite(raw)
    if seconds is not None:
        return max(0.0, seconds)
    parsed = email.utils.parsedate_to_datetime(raw) if _looks_like_date(raw) else None
    if parsed is None:
        return None
    now = time.time() if now_s is None else now_s
    return max(0.0, parsed.timestamp() - now)


def _finite(raw: str) -> float | None:
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _looks_like_date(raw: str) -> bool:
    try:
        return email.utils.parsedate_tz(raw) is not None
    except (TypeError, ValueError):
        return False


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = constants.DEFAULT_MAX_ATTEMPTS
    base_s: float = constants.DEFAULT_BACKOFF_BASE_S
    cap_s: float = constants.DEFAULT_BACKOFF_CAP_S

    def backoff_s(self, failures: int, rng: random.Random | None = None) -> float:
        """Full jitter (AWS "Exponential Backoff and Jitter"): uniform(0, min(cap, base*2^n))."""
        ceiling = min(self.cap_s, self.base_s * (2 ** max(0, failures - 1)))
        return (rng or random).uniform(0, ceiling)

    def delay_s(
        self, failures: int, retry_after_s: float | None, rng: random.Random | None = None
    ) -> float:
        """The upstream's Retry-After wins when it asks for longer than our own backoff."""
        backoff = self.backoff_s(failures, rng)
        if retry_after_s is None:
            return backoff
        return max(min(retry_after_s, constants.MAX_RETRY_AFTER_S), backoff)
