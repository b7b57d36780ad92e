"""Control a job once it is stored: cancel it, or run its failed requests again."""

from __future__ import annotations

from worker import constants, errors
from worker.db import repository
from worker.db.models import JOB_ENDED, JobStatus
from worker.redis_clients import redis_url, sync_redis
from worker.service import ending
from worker.service.scope import OPERATOR, Scope, sessions, visible_job
from worker.service.submit import JobOptions, enqueue_job
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


def retry_job(
    job_id: str,
    settings: Settings | None = None,
    scope: Scope = OPERATOR,
    max_tokens: int | None = None,
    max_cost: float | None = None,
) -> int:
    """Run a finished job's failed (and cancelled) requests again under the same id, after a
    key was topped up or a cap raised; returns how many were queued. A cap given replaces
    the old one and counts everything the job has billed, its first run included."""
    JobOptions(max_tokens=max_tokens, max_cost=max_cost).check()
    settings = settings or get_settings()
    with sessions(settings).begin() as session:
        job = visible_job(session, job_id, scope)
        if job.status not in JOB_ENDED:
            raise errors.JobNotFinished(
                f"job {job_id} is still {job.status}: retry runs a finished job's failed requests"
            )
        if max_tokens is not None:
            job.max_tokens = max_tokens
        if max_cost is not None:
            job.max_cost = max_cost
        queued = repository.requeue_for_retry(session, job_id)
        if queued:
            job.status, job.finished_at = JobStatus.RUNNING, None
        priority = job.priority
    if queued:
        # A cancelled job's mark would stop its calls at the slot script.
        sync_redis(redis_url(settings)).delete(constants.CANCELLED_JOB_KEY.format(job_id=job_id))
        enqueue_job(job_id, priority, settings)
    return queued
