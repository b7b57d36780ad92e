"""Servers restarted under a running job: Redis with and without its data, PostgreSQL.

Each test owns the server it restarts (see conftest.py in this folder) and stops it while
workers are mid-job, waits until the workers have seen it go, then starts it again. Whatever
restarts, the job completes with exactly the results the stand-in computes, each request is
called upstream and written once, no key ever has more calls in flight than its limit, and
every slot comes back.

Fixture order matters at teardown: the servers and the database are requested before
`make_env`, so the workers are stopped before what they write to goes away.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
LATENCY_MS = 150
PER_TASK = constants.REQUESTS_PER_TASK[constants.QUEUE_BULK]
# A worker takes another message whenever fewer than its backlog of requests are in flight
# in it (worker/pipeline.py), so early in a job each worker holds about backlog + PER_TASK.
# Enough requests that some still wait in the broker when Redis stops: a restart then finds
# requests running, requests queued in SQL, and messages stored only in Redis.
BACKLOG = max(
    getattr(constants, "MIN_BACKLOG", 0),
    getattr(constants, "BACKLOG_PER_SLOT", 0) * sum(LIMITS.values()),
)
REQUESTS = max(40, 2 * (BACKLOG + PER_TASK) + 8)
# Short sweeps and call timeout, so recovery (and the key pool's quarantine of one slot
# lease = call timeout + 5 s) fits in a test.
FAST_RECOVERY = {
    "RERANK_REQUEST_LEASE_S": "10",
    "RERANK_SWEEP_INTERVAL_S": "0.5",
    "RERANK_DISPATCH_STALE_S": "2",
    "RERANK_CALL_TIMEOUT_S": "3",
}
# A worker's log says it noticed Redis go: Celery's consumer, or the key pool.
REDIS_LOST_MARKS = ("Connection to broker lost", "action=redis_unreachable")
JOB_DEADLINE_S = 60


def start_job(
    env: Env, standin: ThreadedStandin, tmp_path: Path, requests: list[dict[str, Any]]
) -> str:
    standin.update(latency_ms=LATENCY_MS)
    env.start_worker(concurrency=1, name="one")
    env.start_worker(concurrency=1, name="two")
    job_id: str = submit(env, write_jsonl(tmp_path / "requests.jsonl", requests))
    wait_for(lambda: standin.stats()["total"]["ok"] >= 3, 30, "a few calls to succeed")
    return job_id


def every_worker_logged(env: Env, marks: tuple[str, ...]) -> bool:
    logs = [path.read_text(errors="replace") for path in env.logs]
    return all(any(mark in log for mark in marks) for log in logs)


def queued_messages(own_redis: OwnRedis) -> int:
    client = own_redis.client()
    try:
        return sum(int(client.llen(queue)) for queue in constants.PRIORITIES)
    finally:
        client.close()


RESTART_MARKER = "test:before-restart"


def set_marker(own_redis: OwnRedis) -> None:
    client = own_redis.client()
    try:
        client.set(RESTART_MARKER, "1")
    finally:
        client.close()


def has_marker(own_redis: OwnRedis) -> bool:
    client = own_redis.client()
    try:
        return bool(client.exists(RESTART_MARKER))
    finally:
        client.close()


@contextmanager
def down(
    stop: Callable[[], None], start: Callable[[], None], running: Callable[[], bool]
) -> Iterator[None]:
    """Stop a server for the block; if the block fails, start it again before teardown
    (workers cannot shut down while they wait for a server that never comes back)."""
    stop()
    try:
        yield
    except BaseException:
        if not running():
            start()
        raise


def wait_until_upstream_quiet(standin: ThreadedStandin, quiet_s: float = 1.0) -> None:
    """Until no call is in flight and none has started for quiet_s: all work that did not
    need the stopped server has run."""
    last = {"calls": -1, "changed": time.monotonic()}

    def quiet() -> bool:
        total = standin.stats()["total"]
        if total["calls"] != last["calls"] or total["in_flight"]:
            last.update(calls=total["calls"], changed=time.monotonic())
        return time.monotonic() - last["changed"] >= quiet_s

    wait_for(quiet, 60, "the upstream calls to stop")


@contextmanager
def redis_down_mid_job(
    env: Env, standin: ThreadedStandin, own_redis: OwnRedis, persist: bool
) -> Iterator[None]:
    """Stop Redis; enter once both workers saw it go and no upstream call is in flight."""
    with down(own_redis.stop, lambda: own_redis.start(persist), lambda: own_redis.running):
        wait_for(
            lambda: every_worker_logged(env, REDIS_LOST_MARKS), 30, "both workers to see Redis go"
        )
        wait_until_upstream_quiet(standin)
        yield


def assert_exact_results(env: Env, job_id: str, requests: list[dict[str, Any]]) -> None:
    lines = results_of(env, job_id)
    assert [line["custom_id"] for line in lines] == [r["custom_id"] for r in requests]
    not_ok = [line for line in lines if line["status"] != "succeeded"]
    assert not not_ok, not_ok[:3]
    for line, request in zip(lines, requests, strict=True):
        assert line["results"] == expected_results(request), line["custom_id"]


def assert_limits_held(standin: ThreadedStandin) -> dict[str, int]:
    keys = standin.stats()["keys"]
    peaks = {name: keys[name]["max_in_flight"] for name in LIMITS}
    print(f"stand-in max_in_flight per key: {peaks} (limits {LIMITS})")
    assert all(peaks[name] <= limit for name, limit in LIMITS.items()), (peaks, LIMITS)
    assert sum(peaks.values()) >= 2, "the keys were never used concurrently: proves nothing"
    return peaks


def assert_each_request_called_once_and_billed(
    env: Env, standin: ThreadedStandin, job_id: str
) -> None:
    total = standin.stats()["total"]
    assert total["ok"] == REQUESTS, f"{total['ok']} successful calls for {REQUESTS} requests"
    usage = json.loads(env.cli("usage", "--job", job_id, "--json").stdout)
    assert usage["total_tokens"] == total["tokens_billed"]


def assert_slots_come_back(own_redis: OwnRedis) -> None:
    client = own_redis.client()
    try:
        for name in LIMITS:
            slots = constants.SLOTS_KEY.format(name=name)
            wait_for(lambda s=slots: client.zcard(s) == 0, 30, f"{name}'s slots to come back")
    finally:
        client.close()


@pytest.mark.slow
def test_redis_restarted_with_its_data_mid_job_completes_exactly_within_limits(
    own_redis: OwnRedis,
    postgres_url: str,
    make_env: Any,
    standin: ThreadedStandin,
    tmp_path: Path,
) -> None:
    env: Env = make_env(
        postgres_url, api_keys(**LIMITS), RERANK_REDIS_URL=own_redis.url, **FAST_RECOVERY
    )
    requests = make_requests(REQUESTS)
    job_id = start_job(env, standin, tmp_path, requests)
    waiting = queued_messages(own_redis)
    assert waiting > 0, "no message waited in the broker (resize REQUESTS): proves less"

    with redis_down_mid_job(env, standin, own_redis, persist=True):
        calls_while_down = standin.stats()["total"]["calls"]
        own_redis.start(persist=True)
    assert queued_messages(own_redis) == waiting, "the append-only file lost messages"

    wait_ok(env, job_id, timeout_s=JOB_DEADLINE_S)
    assert standin.stats()["total"]["calls"] > calls_while_down
    assert_exact_results(env, job_id, requests)
    assert_each_request_called_once_and_billed(env, standin, job_id)
    assert_limits_held(standin)
    assert_slots_come_back(own_redis)


@pytest.mark.slow
def test_redis_restarted_empty_mid_job_completes_from_sql_within_limits(
    own_redis: OwnRedis,
    postgres_url: str,
    make_env: Any,
    standin: ThreadedStandin,
    tmp_path: Path,
) -> None:
    """Every message, lease, pause and epoch is gone: the sweeper re-sends the waiting
    requests from SQL, and the key pools quarantine new slots for one lease."""
    env: Env = make_env(
        postgres_url, api_keys(**LIMITS), RERANK_REDIS_URL=own_redis.url, **FAST_RECOVERY
    )
    requests = make_requests(REQUESTS)
    job_id = start_job(env, standin, tmp_path, requests)
    assert queued_messages(own_redis) > 0, "no message waited in the broker (resize REQUESTS)"
    set_marker(own_redis)

    with redis_down_mid_job(env, standin, own_redis, persist=False):
        own_redis.start(persist=False)
    # The restart lost everything. (Not read off the queues: the sweeper may already have
    # re-sent the waiting requests by the time this looks.)
    assert not has_marker(own_redis)

    wait_ok(env, job_id, timeout_s=JOB_DEADLINE_S)
    logs = env.all_logs()
    assert "action=redis_state_lost" in logs, "no key pool noticed Redis lost its state"
    assert "action=sweep_requeue" in logs, "the lost requests were not re-sent from SQL"
    assert_exact_results(env, job_id, requests)
    assert_each_request_called_once_and_billed(env, standin, job_id)
    assert_limits_held(standin)
    assert_slots_come_back(own_redis)


@pytest.mark.slow
def test_postgres_restarted_mid_job_every_result_is_written_once(
    own_postgres: OwnPostgres,
    make_env: Any,
    standin: ThreadedStandin,
    tmp_path: Path,
) -> None:
    """Results computed while the database is down are written once it is back."""
    env: Env = make_env(own_postgres.url, api_keys(**LIMITS), RERANK_SWEEP_INTERVAL_S="0.5")
    requests = make_requests(REQUESTS)
    job_id = start_job(env, standin, tmp_path, requests)

    ok_at_stop = standin.stats()["total"]["ok"]
    with down(own_postgres.stop, own_postgres.start, lambda: own_postgres.running):
        # The claimed requests run to the end; none of their results can be written yet.
        wait_for(
            lambda: standin.stats()["total"]["ok"] >= ok_at_stop + 5,
            30,
            "calls to finish while the database is down",
        )
        wait_until_upstream_quiet(standin)
        ok_while_down = standin.stats()["total"]["ok"]
        own_postgres.start()
    print(f"successful calls: {ok_at_stop} before the stop, {ok_while_down} by the restart")

    wait_ok(env, job_id, timeout_s=JOB_DEADLINE_S)
    assert_exact_results(env, job_id, requests)
    with get_engine(own_postgres.url).connect() as connection:
        rows = connection.execute(
            text("SELECT position, custom_id, status FROM request WHERE job_id = :job"),
            {"job": job_id},
        ).all()
        ok_calls = connection.execute(
            text(
                "SELECT request_id, count(*) FROM upstream_call "
                "WHERE job_id = :job AND outcome = 'ok' GROUP BY request_id"
            ),
            {"job": job_id},
        ).all()
    assert sorted(position for position, _, _ in rows) == list(range(REQUESTS))
    assert sorted(custom_id for _, custom_id, _ in rows) == sorted(r["custom_id"] for r in requests)
    assert {status for _, _, status in rows} == {"succeeded"}
    assert len(ok_calls) == REQUESTS and {count for _, count in ok_calls} == {1}
    assert_each_request_called_once_and_billed(env, standin, job_id)
    assert_limits_held(standin)
