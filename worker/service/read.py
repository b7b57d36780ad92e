"""Read jobs: progress, status with usage, lists, and result lines in input order."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from typing import IO, Any

from sqlalchemy.orm import Session

from worker.db import repository
from worker.db.models import Job, RequestStatus
from worker.service.scope import OPERATOR, Scope, sessions, visible_job
from worker.service.usage import cache_totals, usage_totals
from worker.settings import Settings


def job_progress(
    job_id: str, settings: Settings | None = None, scope: Scope = OPERATOR
) -> dict[str, Any]:
    """The job and its request counts: what a poller needs, without usage's aggregates."""
    with sessions(settings)() as session:
        return _progress(session, visible_job(session, job_id, scope))


def job_state(job_id: str, settings: Settings | None = None, scope: Scope = OPERATOR) -> str:
    """Only the job's status: one row by its key, cheap enough to poll whatever its size."""
    with sessions(settings)() as session:
        return visible_job(session, job_id, scope).status


def _progress(session: Session, job: Job) -> dict[str, Any]:
    counts = repository.job_counts(session, job.id)
    return {
        **job_summary(job),
        "total": counts.total,
        "succeeded": counts.succeeded,
        "failed": counts.failed,
        "cancelled": counts.cancelled,
        "pending": counts.pending,
        "warnings": repository.job_warnings(job),
    }


def job_status(
    job_id: str, settings: Settings | None = None, scope: Scope = OPERATOR
) -> dict[str, Any]:
    """The job's progress with its usage and score-cache savings so far."""
    with sessions(settings)() as session:
        progress = _progress(session, visible_job(session, job_id, scope))
        rows = repository.usage(session, job_id)
        savings = repository.cache_savings(session, job_id)
    return {**progress, "usage": usage_totals(rows), "cache": cache_totals(savings)}


def job_summary(job: Job) -> dict[str, Any]:
    def iso(value: dt.datetime | None) -> str | None:
        return value.isoformat() if value else None

    return {
        "id": job.id,
        "status": job.status,
        "priority": job.priority,
        "source": job.source,
        "total_requests": job.total_requests,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
    }


def list_jobs(
    status: str | None, limit: int, settings: Settings | None = None, scope: Scope = OPERATOR
) -> list[dict[str, Any]]:
    with sessions(settings)() as session:
        jobs = repository.list_jobs(
            session, visible=scope.jobs_filter(), status=status, limit=limit
        )
        return [job_summary(j) for j in jobs]


def result_line(
    custom_id: str,
    status: str,
    results_json: str | None,
    total_tokens: int,
    error_type: str | None,
    error_message: str | None,
) -> str:
    """One JSON line of `results`; the stored results text is spliced in as it is."""
    if status == RequestStatus.SUCCEEDED:
        error = "null"
    elif status in (RequestStatus.QUEUED, RequestStatus.RUNNING):
        status, error = "pending", "null"
    else:
        error = json.dumps({"type": error_type or status, "message": error_message or status})
        status = "failed"
    return (
        f'{{"custom_id":{json.dumps(custom_id, ensure_ascii=False)},"status":"{status}",'
        f'"results":{results_json or "[]"},"usage":{{"total_tokens":{total_tokens}}},'
        f'"error":{error}}}'
    )


def iter_result_chunks(
    job_id: str, settings: Settings | None = None, scope: Scope = OPERATOR
) -> Iterator[str]:
    """The job's result lines in input order, one string per batch of rows (constant
    memory). The job is looked up before the first chunk is asked for, so a missing one
    raises JobNotFound at the call, not halfway through a stream."""
    session = sessions(settings)()
    try:
        visible_job(session, job_id, scope)
    except BaseException:
        session.close()
        raise
    return _chunks(session, job_id)


def _chunks(session: Session, job_id: str) -> Iterator[str]:
    with session:
        for rows in repository.iter_results(session, job_id):
            yield "".join([result_line(*row) + "\n" for row in rows])


def write_results(
    job_id: str, out: IO[str], settings: Settings | None = None, scope: Scope = OPERATOR
) -> int:
    """Write the job's result lines to `out`, one write per batch of rows; returns the count."""
    count = 0
    for chunk in iter_result_chunks(job_id, settings, scope):
        out.write(chunk)
        count += chunk.count("\n")
    return count
