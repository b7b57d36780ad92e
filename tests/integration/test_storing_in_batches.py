"""A requests file larger than one batch: validated whole before anything is stored, then
stored batch by batch while its first requests already run, on SQLite and PostgreSQL.

A job being stored cannot complete, shows every request it will have, and a job whose
submit died is failed by the sweeper once its storing lease runs out.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import Env, wait_for
from jobs_support import results_of, submit, wait_ok, write_jsonl
from sqlalchemy import func, select, text, update

from worker import broker, celery_app, constants, errors
from worker.db import repository
from worker.db.base import utcnow
from worker.db.models import Job, JobStatus, Request, RequestStatus
from worker.db.session import get_engine, get_sessionmaker
from worker.service import control, ending, read
from worker.service import submit as submit_use_case
from worker.settings import Settings, get_settings
from worker.sweeper import UNSTORED_REASON, sweep_once


def table_counts(url: str) -> dict[str, int]:
    with get_engine(url).connect() as connection:
        return {
            table: connection.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()
            for table in ("job", "request", "document")
        }


def request_lines(count: int) -> list[bytes]:
    return [
        json.dumps({"custom_id": f"r-{i}", "query": f"q {i}", "documents": [f"d {i}"]}).encode()
        for i in range(count)
    ]


@pytest.fixture
def in_process(make_env: Any, database_url: str, monkeypatch: pytest.MonkeyPatch) -> Env:
    """The test's environment applied to this process, whose submits publish to the
    test's broker (the Celery app is made again from these settings)."""
    env: Env = make_env(database_url)
    monkeypatch.setattr(celery_app, "app", celery_app.create_app())
    return env


def test_batches_are_bounded_by_their_size_and_keep_lines_and_positions(
    in_process: Env, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lines after the first batch are parsed again from the spool: their line numbers
    (a request without a custom_id is named after its line) and positions carry on."""
    monkeypatch.setattr(submit_use_case, "BATCH_CONTENT_CHARS", 10_000)
    batches: list[int] = []
    insert_requests = repository.insert_requests

    def counted(session: Any, rows: list[dict[str, Any]]) -> list[int]:
        batches.append(len(rows))
        return insert_requests(session, rows)

    monkeypatch.setattr(repository, "insert_requests", counted)
    image = "data:image/png;base64," + "A" * 3000
    lines = []
    for i in range(9):
        line = {"query": "q", "documents": [{"image": image}, {"image": f"{image}{i}"}]}
        lines += [json.dumps(line).encode(), b"\n"]  # a blank line after each request
    result = submit_use_case.submit_job(iter(lines), source="images", settings=get_settings())
    # A request holds some 6,000 characters of documents: two of them fill a batch.
    assert batches == [2, 2, 2, 2, 1]
    assert (result.total_requests, result.enqueued) == (9, True)
    with get_sessionmaker(database_url)() as session:
        rows = session.execute(
            select(Request.position, Request.custom_id, Request.status)
            .where(Request.job_id == result.job_id)
            .order_by(Request.position)
        ).all()
        job = session.get(Job, result.job_id)
        assert job is not None and job.storing_until is None
    expected = [(i, f"line-{2 * i + 1}", RequestStatus.QUEUED) for i in range(9)]
    assert [tuple(row) for row in rows] == expected
    with get_engine(database_url).connect() as connection:
        last = connection.execute(
            text("SELECT content FROM document ORDER BY request_id DESC, position DESC LIMIT 1")
        ).scalar_one()
    assert json.loads(last) == {"image": f"{image}8"}
    # Each batch was sent as it committed: all nine requests are in the broker.
    sent = broker.queued_messages(get_settings(), constants.QUEUE_BULK)
    assert sent == len(batches)


def test_a_bad_line_after_the_first_batch_stores_and_sends_nothing(
    in_process: Env, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(submit_use_case, "REQUEST_BATCH", 3)
    lines = [*request_lines(10), b'{"query": "q", "documents": []}', *request_lines(2)]
    with pytest.raises(errors.InputError) as caught:
        submit_use_case.submit_job(iter(lines), source="bad", settings=get_settings())
    assert (caught.value.line, caught.value.field) == (11, "documents")
    assert table_counts(database_url) == {"job": 0, "request": 0, "document": 0}
    assert broker.queued_messages(get_settings(), constants.QUEUE_BULK) == 0


def test_the_first_batch_runs_while_the_rest_is_stored(
    in_process: Env, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The submit is held before its second batch until a worker has finished a request of
    the first: work starts before the file is stored, and the job completes only after."""
    monkeypatch.setattr(submit_use_case, "REQUEST_BATCH", 40)
    in_process.start_worker(concurrency=4)
    maker = get_sessionmaker(database_url)
    renew = repository.renew_storing
    seen_while_storing: list[dict[str, Any]] = []

    def held(session: Any, job_id: str, until: dt.datetime) -> bool:
        if not seen_while_storing:
            wait_for(lambda: read.job_status(job_id)["succeeded"] > 0, 60, "a first-batch result")
            seen_while_storing.append(read.job_status(job_id))
        return renew(session, job_id, until)

    monkeypatch.setattr(repository, "renew_storing", held)
    result = submit_use_case.submit_job(
        iter(request_lines(100)), source="held", settings=get_settings()
    )
    (status,) = seen_while_storing
    # 40 of 100 stored, some done: still open, and the 60 to come are counted as pending.
    assert status["status"] in (JobStatus.QUEUED, JobStatus.RUNNING)
    assert status["total"] == 100
    assert status["pending"] == 100 - status["succeeded"]
    wait_ok(in_process, result.job_id)
    lines = results_of(in_process, result.job_id)
    assert [line["custom_id"] for line in lines] == [f"r-{i}" for i in range(100)]
    assert {line["status"] for line in lines} == {"succeeded"}
    with maker() as session:
        count = session.scalar(
            select(func.count()).select_from(Request).where(Request.job_id == result.job_id)
        )
    assert count == 100


def test_a_job_being_stored_does_not_complete_until_its_last_batch(
    in_process: Env, database_url: str
) -> None:
    """Every stored request has ended, but more are to come: the job stays open."""
    settings = get_settings()
    result = submit_use_case.submit_job(iter(request_lines(2)), source="small", settings=settings)
    maker = get_sessionmaker(database_url)
    with maker.begin() as session:
        session.execute(
            update(Job)
            .where(Job.id == result.job_id)
            .values(storing_until=utcnow() + dt.timedelta(seconds=60), total_requests=5)
        )
        session.execute(
            update(Request)
            .where(Request.job_id == result.job_id)
            .values(status=RequestStatus.SUCCEEDED, results_json="[]")
        )
    with maker.begin() as session:
        assert not ending.complete_job_if_done(session, result.job_id)
    progress = read.job_status(result.job_id)
    assert (progress["status"], progress["total"], progress["pending"]) == ("queued", 5, 3)
    with maker.begin() as session:
        repository.end_storing(session, result.job_id)
        assert ending.complete_job_if_done(session, result.job_id)
    assert read.job_status(result.job_id)["status"] == "completed"


def test_a_job_cancelled_while_stored_gets_the_rest_cancelled_and_sends_no_more(
    in_process: Env, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(submit_use_case, "REQUEST_BATCH", 4)
    enqueue_job = submit_use_case.enqueue_job

    def cancel_after_the_first(job_id: str, *args: Any) -> bool:
        sent = enqueue_job(job_id, *args)
        control.cancel_job(job_id)
        return sent

    monkeypatch.setattr(submit_use_case, "enqueue_job", cancel_after_the_first)
    result = submit_use_case.submit_job(
        iter(request_lines(10)), source="cancelled", settings=get_settings()
    )
    status = read.job_status(result.job_id)
    assert (status["status"], status["total"], status["cancelled"]) == ("cancelled", 10, 10)
    # Only the first batch's one task was sent (32 requests to a bulk task).
    assert broker.queued_messages(get_settings(), constants.QUEUE_BULK) == 1


def test_a_submit_killed_while_storing_leaves_a_job_the_sweeper_fails(
    make_env: Any, database_url: str, tmp_path: Path
) -> None:
    """SIGKILL between batches: nothing renews the storing lease, and once it runs out the
    sweeper fails the job and its requests that never ran, with the reason."""
    env: Env = make_env(database_url, RERANK_STORING_LEASE_S="1")
    path = write_jsonl(
        tmp_path / "large.jsonl",
        [{"custom_id": f"r-{i}", "query": "q", "documents": ["d"]} for i in range(60_000)],
    )
    submitting = subprocess.Popen(
        [sys.executable, "-m", "worker", "submit", str(path)],
        env={**os.environ, **env.values},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    maker = get_sessionmaker(database_url)

    def storing_job() -> str | None:
        with maker() as session:
            return session.scalar(select(Job.id).where(Job.storing_until.is_not(None)))

    job_id = wait_for(storing_job, 60, "the job's first batch", every_s=0.01)
    submitting.send_signal(signal.SIGKILL)
    submitting.wait(timeout=10)
    assert storing_job() == job_id, "the submit stored every batch before it was killed"
    status = read.job_status(job_id)
    assert (status["status"], status["total"], status["pending"]) == ("queued", 60_000, 60_000)

    settings = Settings()
    wait_for(
        lambda: sweep_once(settings) >= 0 and read.job_status(job_id)["status"] == "failed",
        30,
        "the sweeper to fail the job",
    )
    status = read.job_status(job_id)
    assert status["pending"] == 0 and status["failed"] == status["total"] < 60_000
    with maker() as session:
        errors_seen = set(
            session.execute(
                select(Request.error_type, Request.error_message).where(Request.job_id == job_id)
            ).all()
        )
    assert errors_seen == {(ending.UNSTORED_ERROR_TYPE, UNSTORED_REASON)}


def test_a_file_of_several_batches_runs_whole_through_the_cli(
    make_env: Any, database_url: str, tmp_path: Path
) -> None:
    env: Env = make_env(database_url)
    env.start_worker(concurrency=4)
    requests = [
        {"custom_id": f"r-{i}", "query": f"q {i}", "documents": ["a", f"b {i}"]}
        for i in range(2 * submit_use_case.REQUEST_BATCH + 7)
    ]
    job_id = submit(env, write_jsonl(tmp_path / "requests.jsonl", requests))
    wait_ok(env, job_id)
    lines = results_of(env, job_id)
    assert [line["custom_id"] for line in lines] == [r["custom_id"] for r in requests]
    assert {line["status"] for line in lines} == {"succeeded"}
