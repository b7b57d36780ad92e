"""What the displays show (dashboard, `top`): aggregates of SQL and Redis, scoped to the caller."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from worker import broker, errors, keystate
from worker.db import insight, repository
from worker.db.base import utcnow
from worker.redis_clients import redis_url, sync_redis
from worker.service import read
from worker.service.scope import OPERATOR, Scope, sessions, visible_job
from worker.settings import Settings, get_settings

DEFAULT_JOBS = 50
USAGE_DAYS = 30


@dataclass(frozen=True)
class KeysView:
    keys: list[keystate.KeyState]
    queues: dict[str, int]


def keys_view(settings: Settings | None = None) -> KeysView:
    """Every key's slots, pause and retirement, and the queues' depths, from Redis."""
    settings = settings or get_settings()
    client = sync_redis(redis_url(settings))
    keys = keystate.known_keys(client, _configured_keys(settings))
    return KeysView(keystate.read(client, keys), broker.queue_depths(settings))


def _configured_keys(settings: Settings) -> tuple[Any, ...]:
    """The CLI's keys when it has any; the API has none (it then reads what workers published)."""
    try:
        return settings.keys
    except errors.ConfigError:
        return ()


def jobs(
    scope: Scope = OPERATOR,
    settings: Settings | None = None,
    *,
    limit: int = DEFAULT_JOBS,
    open_only: bool = False,
) -> list[insight.JobProgress]:
    with sessions(settings)() as session:
        return insight.jobs_with_progress(
            session, scope.jobs_filter(), limit=limit, open_only=open_only
        )


def job_detail(job_id: str, scope: Scope, settings: Settings | None = None) -> dict[str, Any]:
    """One job's counts, failures by type, calls by key and status, and deliveries."""
    with sessions(settings)() as session:
        visible_job(session, job_id, scope)
        (progress,) = insight.jobs_with_progress(
            session, scope.jobs_filter(), limit=1, job_id=job_id
        )
        return {
            "job": progress,
            "failures": insight.failures_by_type(session, job_id),
            "calls": insight.calls_by_key_and_status(session, job_id),
            "notifications": [
                read.notification_summary(n)
                for n in repository.notifications_of_job(session, job_id)
            ],
        }


def recent_calls(window_s: float, settings: Settings | None = None) -> list[insight.RecentCalls]:
    """Calls per key in the last `window_s` seconds (every tenant's: keys are shared)."""
    with sessions(settings)() as session:
        return insight.recent_calls(session, utcnow() - dt.timedelta(seconds=window_s))


def usage_by_day(
    scope: Scope = OPERATOR, settings: Settings | None = None, *, days: int = USAGE_DAYS
) -> list[insight.DailyUsage]:
    since = (utcnow() - dt.timedelta(days=days - 1)).replace(
        hour=0, minute=0, second=0, microsecond=0
    )
    with sessions(settings)() as session:
        if scope.sees_all:
            return insight.usage_by_day(session, None, None, since)
        return insight.usage_by_day(session, scope.jobs_filter(), scope.rollup_filter(), since)
