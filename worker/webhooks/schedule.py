"""When a failed notification is tried again: a pure value, parsed from settings."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from worker import errors


@dataclass(frozen=True)
class RetrySchedule:
    """The pause after each failed attempt (the first entry follows the first attempt), held
    at its last entry once it runs out, for at most `max_attempts` attempts in all."""

    delays_s: tuple[float, ...]
    max_attempts: int

    @classmethod
    def parse(cls, text: str, max_attempts: int) -> RetrySchedule:
        """`text` is comma-separated seconds, e.g. "5,300,1800"."""
        try:
            delays = tuple(float(part) for part in text.split(",") if part.strip())
        except ValueError as exc:
            raise errors.ConfigError(
                f"RERANK_WEBHOOK_RETRY_SCHEDULE_S: expected comma-separated seconds, got {text!r}"
            ) from exc
        if not delays or any(delay < 0 for delay in delays):
            raise errors.ConfigError(
                "RERANK_WEBHOOK_RETRY_SCHEDULE_S: expected one or more seconds >= 0"
            )
        if max_attempts < 1:
            raise errors.ConfigError("RERANK_WEBHOOK_MAX_ATTEMPTS must be >= 1")
        return cls(delays, max_attempts)

    def delay_after(self, attempts: int) -> dt.timedelta | None:
        """The pause after `attempts` failed attempts; None when no attempt is left."""
        if attempts >= self.max_attempts:
            return None
        return dt.timedelta(seconds=self.delays_s[min(attempts, len(self.delays_s)) - 1])

    def next_attempt_at(self, attempts: int, now: dt.datetime) -> dt.datetime | None:
        delay = self.delay_after(attempts)
        return None if delay is None else now + delay
