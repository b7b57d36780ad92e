"""Servers restarted under a running job: Redis with and without its data, PostgreSQL.

Each test owns the server it restarts (see conftest.py here). Whatever restarts, the job
completes with exactly the results the stand-in computes, each request's result is written
once, and no key ever has more calls in flight than its limit.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Env, OwnPostgres, OwnRedis, api_keys, wait_for
from jobs_support import expected_results, make_requests, results_of, submit, wait_ok, write_jsonl
from sqlalchemy import text

from worker import constants
from worker.db.session import get_engine
from worker.standin import ThreadedStandin

LIMITS = {"alpha": 2, "beta": 1}
REQUESTS = 40
LATENCY_MS = 150
# Short leases, sweeps and call timeout, so recovery (and the key pool's quarantine of one
# slot lease = call timeout + 5 s) fits in a test.
FAST_RECOVERY = {
    "RERANK_REQUEST_LEASE_S": "5",
    "RERANK_SWEEP_INTERVAL_S": "0.5",
    "RERANK_DISPATCH_STALE_S": "2",
    "RERANK_CALL_TIMEOUT_S": "3",
}
# Markers in a worker's log that it noticed Redis going away: Celery's consumer, or the key
# pool waiting for a slot.
REDIS_LOST_MARKS = ("Connection to broker lost", "action=redis_unreachable")


def start_job(
    env: Env, standin: ThreadedStandin, tmp_path: Path, requests: list[dict[str, Any]]
) -> str:
    """Two workers, one task each: 16 requests run while the rest wait in the broker."""
    standin.update(latency_ms=LATENCY_MS)
    env.start_worker(concurrency=1, name="one")
    env.start_worker(concurrency=1, name="two")
    job_id = submit(env, write_jsonl(tmp_path / "requests.jsonl", requests))
    wait_for(lambda: standin.stats()["total"]["ok"] >= 3, 30, "a few calls to succeed")
    return job_id


def every_worker_saw(env: Env, marks: tuple[str, ...]) -> bool:
    logs = [path.read_text(errors="replace") for path in env.logs]
    return all(any(mark in log for mark in marks) for log in logs)


def assert_exact(env: Env, job_id: str, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    lines = results_of(env, job_id)
    assert [line["custom_id"] for line in lines] == [r["custom_id"] for r in requests]
    failed = [line for line in lines if line["status"] != "succeeded"]
    assert not failed, failed[:3]
    for line, request in zip(lines, requests, strict=True):
        assert line["results"] == expected_results(request), line["custom_id"]
    return lines


def assert_limits_held(standin: ThreadedStandin) -> dict[str, int]:
    stats = standin.stats()
    peaks = {name: stats["keys"][name]["max_in_flight"] for name in LIMITS}
    print(f"max_in_flight per key: {peaks} (limits {LIMITS})")
    for name, limit in LIMITS.items():
        assert peaks[name] <= limit, (name, peaks, LIMITS)
    return peaks


def assert_slots_come_back(own_redis: OwnRedis) -> None:
    client = own_redis.client()
    try:
        for name in LIMITS:
            slots = constants.SLOTS_KEY.format(name=name)
            wait_for(lambda s=slots: client.zcard(s) == 0, 30, f"{name}'s slots to come back")
    finally:
        client.close()


@pytest.mark.slow
def test_redis_restarted_with_its_data_mid_job_the_job_completes_exactly(
    own_redis: OwnRedis,
    make_env: Any,
    postgres_url: str,
    standin: ThreadedStandin,
    tmp_path: Path,
) -> None:
    env: Env = make_env(
        postgres_url, api_keys(**LIMITS), RERANK_REDIS_URL=own_redis.url, **FAST_RECOVERY
    )
    requests = make_requests(REQUESTS)
    job_id = start_job(env, standin, tmp_path, requests)
    broker = own_redis.client()
    queued_before = broker.llen(constants.QUEUE_BULK)
    broker.close()
    assert queued_before > 0, "no message waited in the broker: the restart proves less"

    own_redis.stop()
    wait_for(lambda: every_worker_saw(env, REDIS_LOST_MARKS), 30, "both workers to see Redis go")
    wait_for(lambda: standin.stats()["total"]["in_flight"] == 0, 30, "calls in flight to end")
    calls_while_down = standin.stats()["total"]["calls"]
    own_redis.start(persist=True)
    broker = own_redis.client()
    assert broker.llen(constants.QUEUE_BULK) > 0  # the waiting messages survived
    broker.close()

    wait_ok(env, job_id, timeout_s=60)
    stats = standin.stats()
    print(f"calls before restart {calls_while_down}, total {stats['total']['calls']}")
    assert_exact(env, job_id, requests)
    assert stats["total"]["ok"] == REQUESTS  # each request was called exactly once
    assert_limits_held(standin)
    assert_slots_come_back(own_redis)
    usage = json.loads(env.cli("usage", "--job", job_id, "--json").stdout)
    assert usage["total_tokens"] == stats["total"]["tokens_billed"]
    print(env.all_logs()[-6000:])
