"""End a job, and in the same transaction write whom to tell (the notification outbox).

Every path that ends a job goes through here: the recorder when a job's last request
finishes, the claim that quarantines poison requests, the sweeper, and cancel. The outbox
row commits with the job's new status or not at all, so a job never ends untold and a
notification never tells of a job that did not end.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy.orm import Session

from worker import constants
from worker.db import repository
from worker.db.models import (
    Job,
    JobStatus,
    NotificationKind,
    NotificationStatus,
    RequestStatus,
)
from worker.service import read

# The error of the requests of a job whose submit did not store it whole.
UNSTORED_ERROR_TYPE = "submit_incomplete"

EVENTS = {
    JobStatus.COMPLETED: "job.completed",
    JobStatus.CANCELLED: "job.cancelled",
    JobStatus.FAILED: "job.failed",
}


def complete_job_if_done(session: Session, job_id: str) -> bool:
    """A queued or running job with no pending request is completed (never a cancelled one)."""
    ended = repository.mark_job_ended(session, job_id, JobStatus.COMPLETED, only_when_done=True)
    return _notify(session, job_id, ended)


def complete_jobs_of_requests(session: Session, request_ids: Sequence[int]) -> None:
    for job_id in repository.job_ids_of_requests(session, request_ids):
        complete_job_if_done(session, job_id)


def cancel_job(session: Session, job_id: str) -> bool:
    """The job ends cancelled; its queued requests never run (running ones may finish)."""
    ended = repository.mark_job_ended(session, job_id, JobStatus.CANCELLED)
    repository.cancel_queued_requests(session, job_id)
    return _notify(session, job_id, ended)


def fail_job(session: Session, job_id: str) -> bool:
    """The job ends failed, as a whole (its requests keep the status they have)."""
    ended = repository.mark_job_ended(session, job_id, JobStatus.FAILED)
    return _notify(session, job_id, ended)


def fail_unstored_job(session: Session, job_id: str, reason: str) -> bool:
    """A job whose submit stopped before every request was stored ends failed; its queued
    requests end failed too, with the reason, and never run (running ones may finish)."""
    repository.end_storing(session, job_id)
    repository.end_queued_requests(
        session, job_id, RequestStatus.FAILED, UNSTORED_ERROR_TYPE, reason
    )
    return fail_job(session, job_id)


def _notify(session: Session, job_id: str, ended: repository.EndedJob | None) -> bool:
    """Write the job's notifications, if it just ended and asked for any; True if it ended.

    The body is made here, once: the job object as this transaction sees it, at the moment
    the job ended, and every attempt sends these same bytes.
    """
    if ended is None:
        return False
    if not ended.has_notifications:
        return True
    job = session.get(Job, job_id, populate_existing=True)
    assert job is not None
    event = EVENTS[JobStatus(ended.status)]
    common: dict[str, Any] = {
        "job_id": job_id,
        "tenant_id": ended.tenant_id,
        "event": event,
        "status": NotificationStatus.PENDING,
        "attempts": 0,
        "next_attempt_at": ended.finished_at,
        "created_at": ended.finished_at,
    }
    rows = []
    if ended.webhook_url:
        body = {
            "type": event,
            "timestamp": ended.finished_at.isoformat(),
            "data": read.job_object(session, job, with_notifications=False),
        }
        rows.append(
            {
                **common,
                "message_id": new_message_id(),
                "kind": NotificationKind.WEBHOOK,
                "target": ended.webhook_url,
                "queue": None,
                "payload": json.dumps(body, ensure_ascii=False, separators=(",", ":")),
            }
        )
    if ended.on_complete:
        rows.append(
            {
                **common,
                "message_id": new_message_id(),
                "kind": NotificationKind.CELERY,
                "target": ended.on_complete,
                "queue": ended.on_complete_queue or constants.DEFAULT_ON_COMPLETE_QUEUE,
                "payload": json.dumps([job_id, ended.status]),
            }
        )
    repository.insert_notifications(session, rows)
    return True


def new_message_id() -> str:
    """A `webhook-id`: made once per notification, the same on every attempt."""
    return "msg_" + uuid.uuid4().hex
