"""Control a job once it is stored: cancel it."""

from __future__ import annotations

from worker import constants
from worker.redis_clients import redis_url, sync_redis
from worker.service import ending
from worker.service.scope import OPERATOR, Scope, sessions, visible_job
from worker.settings import Settings, get_settings


def cancel_job(job_id: str, settings: Settings | None = None, scope: Scope = OPERATOR) -> bool:
    """No new upstream call for the job from now on: SQL for queued requests, a Redis mark
    that the slot script checks before every call for those already running."""
    settings = settings or get_settings()
    with sessions(settings).begin() as session:
        visible_job(session, job_id, scope)
        changed = ending.cancel_job(session, job_id)
    if changed:
        mark = constants.CANCELLED_JOB_KEY.format(job_id=job_id)
        sync_redis(redis_url(settings)).set(mark, "1", ex=constants.CANCEL_MARK_TTL_S)
    return changed
