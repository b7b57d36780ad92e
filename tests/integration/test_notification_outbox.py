"""The outbox in SQL, on SQLite and PostgreSQL: written with the job's end, claimed under a
lease, moved on only by the lease's holder."""

from __future__ import annotations

import datetime as dt
import json
import uuid

import pytest
from sqlalchemy import func, select

from worker.db import repository
from worker.db.base import utcnow
from worker.db.models import Job, JobStatus, Notification, NotificationStatus
from worker.db.session import get_sessionmaker
from worker.service import ending

LEASE_S = 60.0


def add_job(url: str, **notify: str) -> str:
    job_id = uuid.uuid4().hex
    with get_sessionmaker(url).begin() as session:
        session.add(Job(id=job_id, status=JobStatus.RUNNING, priority="bulk", **notify))
    return job_id


def count(url: str) -> int:
    with get_sessionmaker(url)() as session:
        return int(session.scalar(select(func.count()).select_from(Notification)) or 0)


def test_the_notification_commits_with_the_jobs_end_or_not_at_all(database_url: str) -> None:
    job_id = add_job(database_url, webhook_url="http://hooks.test/x", on_complete="app.done")
    maker = get_sessionmaker(database_url)
    with maker() as session:
        assert ending.complete_job_if_done(session, job_id)
        session.rollback()
    assert count(database_url) == 0
    with maker() as session:
        assert session.get(Job, job_id).status == JobStatus.RUNNING  # type: ignore[union-attr]

    with maker.begin() as session:
        assert ending.complete_job_if_done(session, job_id)
    with maker.begin() as session:
        assert not ending.complete_job_if_done(session, job_id)  # ended once, told once
        rows = repository.notifications_of_job(session, job_id)
    assert sorted((r.kind, r.target, r.queue) for r in rows) == [
        ("celery", "app.done", "celery"),
        ("webhook", "http://hooks.test/x", None),
    ]
    webhook = next(r for r in rows if r.kind == "webhook")
    body = json.loads(webhook.payload)
    assert (body["type"], body["data"]["id"], body["data"]["status"]) == (
        "job.completed", job_id, "completed",
    )  # fmt: skip
    callback = next(r for r in rows if r.kind == "celery")
    assert json.loads(callback.payload) == [job_id, "completed"]
    assert webhook.message_id != callback.message_id


def test_a_job_that_asked_for_nothing_ends_without_a_notification(database_url: str) -> None:
    job_id = add_job(database_url)
    with get_sessionmaker(database_url).begin() as session:
        assert ending.cancel_job(session, job_id)
    assert count(database_url) == 0


def ended_jobs(url: str, n: int) -> list[str]:
    ids = [add_job(url, webhook_url=f"http://hooks.test/{i}") for i in range(n)]
    with get_sessionmaker(url).begin() as session:
        for job_id in ids:
            ending.complete_job_if_done(session, job_id)
    return ids


def claim(url: str, now: dt.datetime, limit: int) -> list[repository.ClaimedNotification]:
    with get_sessionmaker(url).begin() as session:
        return repository.claim_notifications(session, now, lease_s=LEASE_S, limit=limit)


def test_a_claimed_notification_is_leased_until_its_lease_runs_out(database_url: str) -> None:
    ended_jobs(database_url, 6)
    now = utcnow()
    first, second = claim(database_url, now, 4), claim(database_url, now, 4)
    assert (len(first), len(second)) == (4, 2)
    assert not {c.id for c in first} & {c.id for c in second}
    assert claim(database_url, now + dt.timedelta(seconds=LEASE_S - 1), 10) == []
    with get_sessionmaker(database_url)() as session:
        assert not repository.any_notification_due(session, now)

    again = claim(database_url, now + dt.timedelta(seconds=LEASE_S + 1), 10)
    assert sorted(c.id for c in again) == sorted(c.id for c in first + second)
    assert {c.attempt for c in again} == {2}


def test_only_the_holder_of_the_lease_moves_a_notification_on(database_url: str) -> None:
    ended_jobs(database_url, 1)
    now = utcnow()
    (lost,) = claim(database_url, now, 1)
    (holder,) = claim(database_url, now + dt.timedelta(seconds=LEASE_S + 1), 1)
    maker = get_sessionmaker(database_url)

    def record(c: repository.ClaimedNotification, outcome: NotificationStatus) -> bool:
        attempt = repository.AttemptRecord(c.id, c.attempt, now, 5.0, 204, None, outcome)
        with maker.begin() as session:
            return repository.record_attempt(session, attempt)

    assert not record(lost, NotificationStatus.DELIVERED)
    with maker() as session:
        assert session.get(Notification, holder.id).status == "delivering"  # type: ignore[union-attr]
    assert record(holder, NotificationStatus.DELIVERED)
    with maker() as session:
        row = session.get(Notification, holder.id)
        assert row is not None and (row.status, row.attempts) == ("delivered", 2)
        attempts = repository.attempts_of_notifications(session, [row.id])
    assert [a.attempt for a in attempts] == [1, 2]


def test_workers_claiming_at_once_on_postgresql_skip_each_others_rows(postgres_url: str) -> None:
    """SQLite runs one writer at a time; PostgreSQL's claims overlap, FOR UPDATE SKIP LOCKED."""
    ended_jobs(postgres_url, 6)
    now = utcnow()
    maker = get_sessionmaker(postgres_url)
    with maker.begin() as holding, maker.begin() as other:
        first = repository.claim_notifications(holding, now, lease_s=LEASE_S, limit=4)
        second = repository.claim_notifications(other, now, lease_s=LEASE_S, limit=4)
    assert (len(first), len(second)) == (4, 2)
    assert not {c.id for c in first} & {c.id for c in second}


@pytest.mark.parametrize("status", [JobStatus.CANCELLED, JobStatus.FAILED])
def test_every_way_a_job_ends_tells_its_event(database_url: str, status: JobStatus) -> None:
    job_id = add_job(database_url, webhook_url="http://hooks.test/x")
    end = ending.cancel_job if status == JobStatus.CANCELLED else ending.fail_job
    with get_sessionmaker(database_url).begin() as session:
        assert end(session, job_id)
        (row,) = repository.notifications_of_job(session, job_id)
    assert json.loads(row.payload)["type"] == f"job.{status.value}" == row.event
