"""End-of-job notices (worker/completion.py): a worker announces an interactive job's end on
Redis once it is committed, and a waiter that misses the notice still finds the end in SQL."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import anyio
import redis
from conftest import Env
from jobs_support import submit, wait_ok, write_jsonl

from worker import completion, constants
from worker.db import repository
from worker.redis_clients import async_redis
from worker.service import control
from worker.service import rerank as rerank_service
from worker.service.read import job_progress
from worker.service.scope import OPERATOR, sessions
from worker.service.submit import JobOptions, submit_job
from worker.settings import get_settings


def notice_key(job_id: str) -> str:
    return constants.JOB_ENDED_KEY.format(job_id=job_id)


def test_an_interactive_jobs_end_is_announced_after_its_commit_and_a_bulk_jobs_is_not(
    make_env: Any, database_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    env: Env = make_env(database_url)
    env.start_worker(concurrency=4)
    request = {"custom_id": "one", "query": "q", "documents": ["a", "b"]}
    path = write_jsonl(tmp_path / "one.jsonl", [request])

    interactive = submit(env, path, "--priority", "interactive")
    popped = redis_client.blpop([notice_key(interactive)], timeout=60)
    assert popped is not None, env.all_logs()[-3000:]
    # Whoever wakes on the notice reads the ended job.
    assert job_progress(interactive)["status"] == "completed"
    # A first delivery's notice carries its outcome, the same as SQL holds.
    carried = completion.carried_outcome(popped[1])
    with sessions()() as session:
        assert carried == repository.one_request_outcome(session, interactive)
    assert carried is not None and carried.status == "succeeded" and carried.billed_calls == 1
    assert [r["index"] for r in json.loads(carried.results_json or "")] in ([0, 1], [1, 0])
    # Taken by its waiter: nothing is left behind.
    assert not redis_client.exists(notice_key(interactive))

    bulk = submit(env, path, "--priority", "bulk")
    wait_ok(env, bulk)
    assert not redis_client.exists(notice_key(bulk))


def test_a_waiter_whose_notice_never_comes_finds_the_end_in_sql(
    make_env: Any, sqlite_url: str, tmp_path: Path
) -> None:
    env: Env = make_env(sqlite_url)
    settings = get_settings()
    line = json.dumps({"query": "q", "documents": ["d"]}).encode()
    job_id = submit_job([line], source="test", options=JobOptions(priority="interactive")).job_id
    # No worker: the job ends by a cancel, which announces nothing.
    assert control.cancel_job(job_id)

    async def wait() -> float:
        client = async_redis(env.values["RERANK_REDIS_URL"])
        started = time.monotonic()
        try:
            await rerank_service.wait_for_end(job_id, OPERATOR, client, settings, 30)
        finally:
            await client.aclose()
        return time.monotonic() - started

    waited_s = anyio.run(wait)
    assert waited_s < constants.SYNC_STATUS_CHECK_S + 2
