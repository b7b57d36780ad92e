"""Interactive before bulk on real parts: a worker process whose task threads and key slots are
all taken by a bulk job still picks up an interactive job and runs it next."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from conftest import BOTH_BROKERS, Env, api_keys, wait_for
from jobs_support import results_of, submit, write_jsonl
from sqlalchemy import func, select

from worker import constants
from worker.db.models import Job, JobStatus, Request, RequestStatus, UpstreamCall
from worker.db.session import get_engine
from worker.standin import ThreadedStandin

SLOTS = 4  # alpha 2 + beta 2
THREADS = 4
PER_TASK = constants.REQUESTS_PER_TASK[constants.QUEUE_BULK]
# The pipeline's bound (worker/pipeline.py): a bulk task waits while this many are held.
MAX_BACKLOG = max(constants.MIN_BACKLOG, constants.BACKLOG_PER_SLOT * SLOTS)


def bulk_requests(count: int) -> list[dict[str, Any]]:
    return [
        {"custom_id": f"b-{i}", "query": f"bulk {i}", "documents": [f"d {i}"]} for i in range(count)
    ]


def running_ids(url: str, job_id: str) -> set[int]:
    with get_engine(url).connect() as connection:
        rows = connection.execute(
            select(Request.id).where(
                Request.job_id == job_id, Request.status == RequestStatus.RUNNING
            )
        )
        return {row.id for row in rows}


def job_state(url: str, job_id: str) -> str:
    with get_engine(url).connect() as connection:
        return str(connection.execute(select(Job.status).where(Job.id == job_id)).scalar_one())


def first_calls(url: str, job_id: str) -> dict[int, dt.datetime]:
    """When each request of the job made its first upstream call."""
    with get_engine(url).connect() as connection:
        rows = connection.execute(
            select(UpstreamCall.request_id, func.min(UpstreamCall.created_at))
            .where(UpstreamCall.job_id == job_id)
            .group_by(UpstreamCall.request_id)
        )
        return {request_id: started for request_id, started in rows}


@BOTH_BROKERS
def test_an_interactive_job_overtakes_a_bulk_job_holding_every_thread_and_slot(
    make_env: Any, database_url: str, standin: ThreadedStandin, tmp_path: Path
) -> None:
    env: Env = make_env(database_url, api_keys(alpha=2, beta=2))
    # Slow calls, so the bulk requests already waiting in the worker take many seconds to
    # drain: far longer than it takes to submit and pick up the interactive job.
    standin.update(latency_ms=400)
    env.start_worker(concurrency=THREADS, name="one")
    bulk_id = submit(env, write_jsonl(tmp_path / "bulk.jsonl", bulk_requests(200)))

    # Every task thread holds a bulk task of 32 requests, waiting for room.
    wait_for(
        lambda: (
            len(running_ids(database_url, bulk_id)) >= THREADS * PER_TASK
            and standin.stats()["total"]["in_flight"] == SLOTS
        ),
        60,
        "the bulk job to take every thread and slot",
    )
    waiting = running_ids(database_url, bulk_id)

    request = {"custom_id": "now", "query": "interactive", "documents": ["x", "y", "z"]}
    path = write_jsonl(tmp_path / "interactive.jsonl", [request])
    interactive_id = submit(env, path, "--priority", "interactive")
    wait_for(
        lambda: job_state(database_url, interactive_id) == JobStatus.COMPLETED,
        60,
        "the interactive job",
    )
    assert job_state(database_url, bulk_id) == JobStatus.RUNNING, "it finished before the bulk job"
    [line] = results_of(env, interactive_id)
    assert line["status"] == "succeeded" and len(line["results"]) == 3

    done = env.cli("cancel", bulk_id)
    assert done.returncode == 0, done.stderr
    wait_for(lambda: not running_ids(database_url, bulk_id), 60, "the bulk job to stop")

    [interactive_started] = first_calls(database_url, interactive_id).values()
    bulk_started = first_calls(database_url, bulk_id)
    overtaken = [
        r for r in waiting if r not in bulk_started or bulk_started[r] > interactive_started
    ]
    # It went before bulk requests that were already waiting in the worker when it was
    # submitted: more of them than the pipeline holds, so it neither waited for a Celery
    # thread until the bulk backlog fell below its bound, nor queued behind it for a slot.
    assert len(overtaken) >= MAX_BACKLOG, json.dumps(
        {"waiting": len(waiting), "overtaken": len(overtaken)}
    )
