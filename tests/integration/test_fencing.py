"""Fencing: a request's result is written only by the delivery that holds its current lease."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import update

from worker.db import repository
from worker.db.base import utcnow
from worker.db.models import Job, JobStatus, Request, RequestStatus
from worker.db.session import get_sessionmaker
from worker.domain import RequestOutcome


def queued_request(database_url: str) -> int:
    with get_sessionmaker(database_url).begin() as session:
        session.add(Job(id="fenced", status=JobStatus.QUEUED, priority="bulk", total_requests=1))
        session.flush()
        row = {
            "job_id": "fenced",
            "position": 0,
            "custom_id": "r-0",
            "query": "q",
            "model": "jina-reranker-m0",
            "top_n": None,
            "return_documents": False,
            "document_count": 0,
            "status": RequestStatus.QUEUED,
            "deliveries": 0,
            "total_tokens": 0,
            "enqueued_at": utcnow(),
        }
        (request_id,) = repository.insert_requests(session, [row])
        return request_id


def claim(database_url: str, request_id: int) -> int:
    """Claim the request; the delivery number the claim holds."""
    with get_sessionmaker(database_url).begin() as session:
        (work,), _ = repository.claim_requests(session, [request_id], lease_s=30, max_deliveries=5)
        return work.delivery


def outcome(request_id: int, delivery: int, results: str, tokens: int) -> RequestOutcome:
    return RequestOutcome(
        request_id=request_id,
        job_id="fenced",
        status=RequestStatus.SUCCEEDED,
        delivery=delivery,
        results_json=results,
        total_tokens=tokens,
    )


def record(database_url: str, *outcomes: RequestOutcome) -> None:
    with get_sessionmaker(database_url).begin() as session:
        repository.record_outcomes(session, outcomes)


def renew(database_url: str, request_id: int, delivery: int) -> None:
    with get_sessionmaker(database_url).begin() as session:
        repository.renew_leases(session, [(request_id, delivery)], lease_s=60)


def row(database_url: str, request_id: int) -> Request:
    with get_sessionmaker(database_url)() as session:
        found = session.get(Request, request_id)
        assert found is not None
        session.expunge(found)
        return found


def test_a_late_outcome_of_a_delivery_whose_lease_was_taken_over_is_not_written(
    database_url: str,
) -> None:
    request_id = queued_request(database_url)
    first = claim(database_url, request_id)
    with get_sessionmaker(database_url).begin() as session:  # the first delivery's lease ends
        expired = utcnow() - dt.timedelta(seconds=1)
        session.execute(
            update(Request).where(Request.id == request_id).values(lease_expires_at=expired)
        )
    second = claim(database_url, request_id)
    assert second == first + 1

    # The first delivery comes back late, while the second still runs: it may not renew
    # the lease nor write its result; the tokens its call was billed still count.
    renewed_by_second = row(database_url, request_id).lease_expires_at
    renew(database_url, request_id, first)
    assert row(database_url, request_id).lease_expires_at == renewed_by_second
    record(database_url, outcome(request_id, first, '["old"]', tokens=7))
    late = row(database_url, request_id)
    assert (late.status, late.results_json, late.total_tokens) == (RequestStatus.RUNNING, None, 7)
    assert late.deliveries == second and late.lease_expires_at is not None

    renew(database_url, request_id, second)
    assert row(database_url, request_id).lease_expires_at > renewed_by_second
    record(database_url, outcome(request_id, second, '["new"]', tokens=5))
    done = row(database_url, request_id)
    assert (done.status, done.results_json, done.total_tokens) == (
        RequestStatus.SUCCEEDED,
        '["new"]',
        12,
    )
    assert done.finished_at is not None and done.lease_expires_at is None

    record(database_url, outcome(request_id, first, '["old"]', tokens=3))  # later still
    assert row(database_url, request_id).results_json == '["new"]'
    assert row(database_url, request_id).total_tokens == 15
