"""Read jobs: progress, status with usage, lists, and result lines in input order."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from typing import IO, Any

from sqlalchemy.orm import Session

from worker.db import repository
from worker.db.models import Job, Notification, NotificationStatus, RequestStatus
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
    # Requests a large submit has not stored yet are pending too.
    unstored = job.total_requests - counts.total if job.storing_until is not None else 0
    return {
        **job_summary(job),
        "total": counts.total + unstored,
        "succeeded": counts.succeeded,
        "failed": counts.failed,
        "cancelled": counts.cancelled,
        "pending": counts.pending + unstored,
        "warnings": repository.job_warnings(job),
    }


def job_status(
    job_id: str, settings: Settings | None = None, scope: Scope = OPERATOR
) -> dict[str, Any]:
    """The job's progress with its usage, score-cache savings, budget and notifications."""
    with sessions(settings)() as session:
        return job_object(session, visible_job(session, job_id, scope))


def job_object(session: Session, job: Job, *, with_notifications: bool = True) -> dict[str, Any]:
    """The job object of `status --json` and the API, read in the caller's session.

    A webhook's body carries it without `notifications`: that list would describe the very
    message being sent, as it was before its first attempt.
    """
    progress = _progress(session, job)
    rows = repository.usage(session, job.id)
    savings = repository.cache_savings(session, job.id)
    usage = usage_totals(rows)
    found = {
        **progress,
        "usage": usage,
        "cache": cache_totals(savings),
        "budget": {
            "max_tokens": job.max_tokens,
            "max_cost": job.max_cost,
            "spent_tokens": usage["total_tokens"],
            "spent_cost": usage["cost"],
        },
    }
    if with_notifications:
        found["notifications"] = [
            notification_summary(n) for n in repository.notifications_of_job(session, job.id)
        ]
    return found


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value else None


def notification_summary(notification: Notification) -> dict[str, Any]:
    """One notification of a job: where it goes, and how far its delivery got."""
    return {
        "id": notification.message_id,
        "kind": notification.kind,
        "event": notification.event,
        "target": notification.target,
        "queue": notification.queue,
        "status": notification.status,
        "attempts": notification.attempts,
        "last_status_code": notification.last_status_code,
        "last_error": notification.last_error,
        "next_attempt_at": (
            _iso(notification.next_attempt_at)
            if notification.status == NotificationStatus.PENDING
            else None
        ),
        "created_at": _iso(notification.created_at),
        "delivered_at": _iso(notification.delivered_at),
    }


def job_notifications(
    job_id: str, settings: Settings | None = None, scope: Scope = OPERATOR
) -> list[dict[str, Any]]:
    """The job's notifications, each with every attempt made at it (`rerank-worker webhooks`)."""
    with sessions(settings)() as session:
        job = visible_job(session, job_id, scope)
        notifications = repository.notifications_of_job(session, job.id)
        attempts = repository.attempts_of_notifications(session, [n.id for n in notifications])
    by_notification: dict[int, list[dict[str, Any]]] = {n.id: [] for n in notifications}
    for attempt in attempts:
        by_notification[attempt.notification_id].append(
            {
                "attempt": attempt.attempt,
                "started_at": _iso(attempt.started_at),
                "status_code": attempt.status_code,
                "error": attempt.error,
                "duration_ms": round(attempt.duration_ms, 1),
            }
        )
    return [
        {**notification_summary(n), "attempt_log": by_notification[n.id]} for n in notifications
    ]


def job_summary(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "status": job.status,
        "priority": job.priority,
        "source": job.source,
        "total_requests": job.total_requests,
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
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
