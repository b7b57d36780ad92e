"""Large inputs and outputs on SQLite and PostgreSQL: documents stream into SQL as the file
is read, a bad line late in a corpus leaves nothing behind, and results stream back in
input order."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from jobs_support import submit, write_jsonl
from sqlalchemy import event, text, update
from sqlalchemy.orm import Session

from worker import constants, errors
from worker.db import repository
from worker.db.base import utcnow
from worker.db.models import Job, JobStatus, Request, RequestStatus
from worker.db.session import get_engine, get_sessionmaker
from worker.domain import RequestOutcome
from worker.service import read
from worker.service import submit as submit_use_case
from worker.settings import Settings

CORPUS_DOCUMENTS = 12_000


def table_counts(url: str) -> dict[str, int]:
    with get_engine(url).connect() as connection:
        return {
            table: connection.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()
            for table in ("job", "request", "document")
        }


def new_job(session: Session, requests: int) -> tuple[str, list[int]]:
    """A job with `requests` queued requests (custom_id r-0, r-1, ...) and no documents."""
    job_id = f"job{requests}"
    session.add(Job(id=job_id, status=JobStatus.QUEUED, priority="bulk", total_requests=requests))
    session.flush()
    rows = [
        {
            "job_id": job_id,
            "position": position,
            "custom_id": f"r-{position}",
            "query": "q",
            "model": "jina-reranker-m0",
            "top_n": None,
            "return_documents": False,
            "document_count": 1,
            "status": RequestStatus.QUEUED,
            "deliveries": 0,
            "total_tokens": 0,
            "enqueued_at": utcnow(),
        }
        for position in range(requests)
    ]
    return job_id, repository.insert_requests(session, rows)


def test_documents_from_a_generator_are_stored_in_order_and_counted(database_url: str) -> None:
    total = 2 * repository.DOCUMENT_INSERT_BATCH + 7
    with get_sessionmaker(database_url).begin() as session:
        _, (request_id,) = new_job(session, 1)
        rows = (
            (request_id, i, json.dumps(f"doc {i}"), f"id-{i}" if i % 2 else None)
            for i in range(total)
        )
        assert repository.insert_documents(session, rows) == total
    with get_engine(database_url).connect() as connection:
        stored = connection.execute(
            text("SELECT position, content, doc_id FROM document ORDER BY position")
        ).all()
    assert [tuple(row) for row in stored] == [
        (i, json.dumps(f"doc {i}"), f"id-{i}" if i % 2 else None) for i in range(total)
    ]


def test_an_error_raised_while_documents_stream_propagates_and_stores_nothing(
    database_url: str,
) -> None:
    def rows(request_id: int) -> Iterator[repository.DocumentRow]:
        yield (request_id, 0, '"a"', None)
        yield (request_id, 1, '"b"', None)
        raise errors.InputError("document text is empty", line=3)

    with pytest.raises(errors.InputError), get_sessionmaker(database_url).begin() as session:
        _, (request_id,) = new_job(session, 1)
        repository.insert_documents(session, rows(request_id))
    assert table_counts(database_url) == {"job": 0, "request": 0, "document": 0}


def test_a_bad_line_late_in_a_corpus_names_it_and_stores_no_job(database_url: str) -> None:
    lines = [json.dumps({"id": i, "text": f"doc {i}"}).encode() for i in range(CORPUS_DOCUMENTS)]
    lines += [b'{"id": "x", "text": ""}', b'"after the bad line"']
    with pytest.raises(errors.InputError) as caught:
        submit_use_case.submit_job(
            iter(lines),
            source="corpus",
            options=submit_use_case.JobOptions(query="q"),
            settings=Settings(database_url=database_url),
        )
    assert (caught.value.line, caught.value.field) == (CORPUS_DOCUMENTS + 1, "text")
    assert table_counts(database_url) == {"job": 0, "request": 0, "document": 0}


def finish(session: Session, job_id: str) -> None:
    """r-1 failed, r-4 still queued, the rest succeeded with one result each."""
    of_job = Request.job_id == job_id
    session.execute(
        update(Request)
        .where(of_job)
        .values(
            status=RequestStatus.SUCCEEDED,
            results_json='[{"index":0,"relevance_score":0.5}]',
            total_tokens=10,
        )
    )
    session.execute(
        update(Request)
        .where(of_job, Request.custom_id == "r-1")
        .values(
            status=RequestStatus.FAILED,
            results_json=None,
            error_type="invalid_request",
            error_message="bad",
        )
    )
    session.execute(
        update(Request)
        .where(of_job, Request.custom_id == "r-4")
        .values(status=RequestStatus.QUEUED, results_json=None)
    )


def test_results_stream_in_input_order_in_batches(database_url: str) -> None:
    with get_sessionmaker(database_url).begin() as session:
        job_id, _ = new_job(session, 7)
        finish(session, job_id)
    with get_sessionmaker(database_url)() as session:
        batches = list(repository.iter_results(session, job_id, batch=3))
    assert [len(b) for b in batches] == [3, 3, 1]
    assert [row[0] for batch in batches for row in batch] == [f"r-{i}" for i in range(7)]


def test_write_results_writes_one_line_per_request_in_input_order(database_url: str) -> None:
    with get_sessionmaker(database_url).begin() as session:
        job_id, _ = new_job(session, 7)
        finish(session, job_id)
    out = io.StringIO()
    count = read.write_results(job_id, out, Settings(database_url=database_url))
    lines: list[dict[str, Any]] = [json.loads(line) for line in out.getvalue().splitlines()]
    assert count == len(lines) == 7
    assert [line["custom_id"] for line in lines] == [f"r-{i}" for i in range(7)]
    assert [line["status"] for line in lines] == ["succeeded", "failed"] + ["succeeded"] * 2 + [
        "pending"
    ] + ["succeeded"] * 2
    assert lines[0]["results"] == [{"index": 0, "relevance_score": 0.5}]
    assert lines[1]["error"] == {"type": "invalid_request", "message": "bad"}


def reltuples(url: str, table: str) -> float:
    """How many rows PostgreSQL's planner believes the table has (-1: never analyzed)."""
    with get_engine(url).connect() as connection:
        query = text("SELECT reltuples FROM pg_class WHERE oid = to_regclass(:table)")
        return float(connection.execute(query, {"table": table}).scalar_one())


def test_a_large_submit_is_analyzed_before_its_requests_are_sent(
    make_env: Any, postgres_url: str, tmp_path: Path
) -> None:
    env = make_env(postgres_url)
    path = write_jsonl(tmp_path / "corpus.jsonl", [f"doc {i}" for i in range(1500)])
    submit(env, path, "--query", "q")
    assert reltuples(postgres_url, "document") == 1500


def test_a_submit_that_cannot_analyze_in_time_still_sends_its_job(
    make_env: Any, postgres_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    env = make_env(postgres_url)
    path = write_jsonl(tmp_path / "corpus.jsonl", [f"doc {i}" for i in range(1500)])
    with get_engine(postgres_url).connect() as holder:  # as an autovacuum of the table would
        holder.execute(text("LOCK TABLE document IN SHARE UPDATE EXCLUSIVE MODE"))
        done = env.cli("submit", str(path), "--query", "q")
        holder.rollback()
    assert done.returncode == 0, done.stderr
    assert "action=analyze_skipped reason=OperationalError" in done.stderr
    assert reltuples(postgres_url, "document") == -1
    assert redis_client.llen(constants.QUEUE_BULK) == 1


def test_statistics_are_refreshed_only_when_a_submit_outgrows_them(postgres_url: str) -> None:
    maker = get_sessionmaker(postgres_url)
    with maker.begin() as session:
        _, (request_id,) = new_job(session, 1)
        repository.insert_documents(session, ((request_id, i, '"d"', None) for i in range(5000)))
    below_minimum = {"document": repository.ANALYZE_MIN_ROWS - 1, "request": 1}
    statements: list[str] = []

    def keep(_connection: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement)

    engine = get_engine(postgres_url)
    event.listen(engine, "before_cursor_execute", keep)
    try:
        with maker.begin() as session:
            assert repository.refresh_statistics(session, below_minimum) == []
    finally:
        event.remove(engine, "before_cursor_execute", keep)
    assert statements == []  # a small (interactive) submit asks the database nothing
    with maker.begin() as session:
        assert repository.refresh_statistics(session, {"document": 5000}) == ["document"]
    assert reltuples(postgres_url, "document") == 5000
    with maker.begin() as session:
        assert repository.refresh_statistics(session, {"document": 1000}) == []  # a fifth
        assert repository.refresh_statistics(session, {"document": 1001}) == ["document"]


def test_a_claim_does_not_wait_for_another_claim_starting_the_same_job(postgres_url: str) -> None:
    maker = get_sessionmaker(postgres_url)
    with maker.begin() as session:
        job_id, (first_id, second_id) = new_job(session, 2)
    with maker.begin() as first:
        claimed, _ = repository.claim_requests(first, [first_id], lease_s=30, max_deliveries=5)
        assert [w.request_id for w in claimed] == [first_id]  # the job's row is locked till commit
        with maker.begin() as second:
            second.execute(text("SET LOCAL lock_timeout = '2s'"))
            claimed, _ = repository.claim_requests(
                second, [second_id], lease_s=30, max_deliveries=5
            )
            assert [w.request_id for w in claimed] == [second_id]
    with maker() as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert (job.status, job.started_at is not None) == (JobStatus.RUNNING, True)


def test_an_outcome_applies_only_while_running_and_its_tokens_always_count(
    database_url: str,
) -> None:
    maker = get_sessionmaker(database_url)
    with maker.begin() as session:
        _, (running_id, taken_over_id) = new_job(session, 2)
        session.execute(update(Request).values(status=RequestStatus.RUNNING, total_tokens=5))
        session.execute(  # another worker's run of this request ended first
            update(Request)
            .where(Request.id == taken_over_id)
            .values(status=RequestStatus.SUCCEEDED, results_json="[1]")
        )
    with maker.begin() as session:
        outcomes = [
            RequestOutcome(
                request_id=request_id,
                job_id="job2",
                status=RequestStatus.SUCCEEDED,
                delivery=0,
                results_json="[2]",
                total_tokens=7,
                cache_hits=1,
                tokens_saved=3,
            )
            for request_id in (running_id, taken_over_id)
        ]
        repository.record_outcomes(session, outcomes)
    with maker() as session:
        running, taken_over = (session.get(Request, i) for i in (running_id, taken_over_id))
        assert running is not None and taken_over is not None
        assert (running.status, running.results_json, running.total_tokens) == (
            RequestStatus.SUCCEEDED,
            "[2]",
            12,
        )
        assert (running.cache_hits, running.tokens_saved) == (1, 3)
        assert running.finished_at is not None and running.lease_expires_at is None
        assert (taken_over.results_json, taken_over.total_tokens) == ("[1]", 12)
        assert (taken_over.cache_hits, taken_over.finished_at) == (0, None)
