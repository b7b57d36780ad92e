"""Damage done for real: killed worker process groups, lost broker messages, a broker
that is down at submit time. Nothing may be lost, stuck or written twice."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import BOTH_BROKERS, Broker, Env, api_keys, wait_for
from jobs_support import expected_results, make_requests, results_of, submit, wait_ok, write_jsonl

from worker import constants
from worker.standin import ThreadedStandin

FAST_RECOVERY = {
    "RERANK_REQUEST_LEASE_S": "3",
    "RERANK_SWEEP_INTERVAL_S": "0.5",
    "RERANK_DISPATCH_STALE_S": "2",
    "RERANK_CALL_TIMEOUT_S": "3",
}


@BOTH_BROKERS
def test_killed_worker_requests_run_again_on_another_and_slots_come_back(
    make_env: Any,
    broker: Broker,
    postgres_url: str,
    standin: ThreadedStandin,
    tmp_path: Path,
    redis_client: redis.Redis,
) -> None:
    env: Env = make_env(postgres_url, api_keys(alpha=3, beta=2), **FAST_RECOVERY)
    standin.update(latency_ms=150)
    requests = make_requests(40)
    path = write_jsonl(tmp_path / "r.jsonl", requests)
    doomed = env.start_worker(concurrency=4, name="doomed")
    job_id = submit(env, path)
    wait_for(lambda: standin.stats()["total"]["ok"] >= 4, 30, "the doomed worker to be mid-job")
    env.kill_worker(doomed)  # SIGKILL to its whole process group
    assert json.loads(env.cli("status", job_id, "--json").stdout)["pending"] > 0
    env.start_worker(concurrency=4, name="survivor")
    wait_ok(env, job_id, timeout_s=60)

    lines = results_of(env, job_id)
    assert all(line["status"] == "succeeded" for line in lines)
    for line, request in zip(lines, requests, strict=True):
        assert line["results"] == expected_results(request)
    # The dead worker's leases expire by themselves: the keys get every slot back.
    for name in ("alpha", "beta"):
        slots = constants.SLOTS_KEY.format(name=name)
        wait_for(lambda s=slots: redis_client.zcard(s) == 0, 30, f"{name}'s slots to come back")
    usage = json.loads(env.cli("usage", "--job", job_id, "--json").stdout)
    assert usage["total_tokens"] <= standin.stats()["total"]["tokens_billed"]
    if broker.kind == "amqp":  # what the dead worker held went back to RabbitMQ and was run
        assert broker.queued(constants.QUEUE_BULK) == 0


def test_messages_lost_from_the_broker_are_sent_again_from_sql(
    make_env: Any,
    database_url: str,
    standin: ThreadedStandin,
    tmp_path: Path,
    redis_client: redis.Redis,
) -> None:
    env: Env = make_env(database_url, **FAST_RECOVERY)
    requests = make_requests(12)
    job_id = submit(env, write_jsonl(tmp_path / "r.jsonl", requests))
    assert redis_client.llen(constants.QUEUE_BULK) > 0
    redis_client.flushdb()  # Redis restarted without persistence: every message is gone
    env.start_worker(concurrency=2)
    wait_ok(env, job_id, timeout_s=60)
    lines = results_of(env, job_id)
    assert [line["results"] for line in lines] == [expected_results(r) for r in requests]
    assert standin.stats()["total"]["ok"] == 12  # each request ran exactly once


def test_job_submitted_while_the_broker_is_down_runs_once_it_is_back(
    make_env: Any, postgres_url: str, standin: ThreadedStandin, tmp_path: Path
) -> None:
    env: Env = make_env(postgres_url, **FAST_RECOVERY)
    requests = make_requests(5)
    path = write_jsonl(tmp_path / "r.jsonl", requests)
    broker = env.values["RERANK_REDIS_URL"]
    env.values["RERANK_REDIS_URL"] = "redis://127.0.0.1:1/0"  # nothing listens there
    done = env.cli("submit", str(path))
    assert done.returncode == 0, done.stderr
    assert "broker is unreachable" in done.stderr
    job_id = done.stdout.strip().splitlines()[-1]
    env.values["RERANK_REDIS_URL"] = broker
    env.start_worker(concurrency=2)
    wait_ok(env, job_id, timeout_s=60)
    assert [line["results"] for line in results_of(env, job_id)] == [
        expected_results(r) for r in requests
    ]


@pytest.mark.parametrize("broker", ["amqp"], indirect=True)
def test_messages_purged_from_rabbitmq_are_sent_again_from_sql(
    make_env: Any, broker: Broker, postgres_url: str, standin: ThreadedStandin, tmp_path: Path
) -> None:
    env: Env = make_env(postgres_url, **FAST_RECOVERY)
    requests = make_requests(40)
    job_id = submit(env, write_jsonl(tmp_path / "r.jsonl", requests))
    assert broker.queued(constants.QUEUE_BULK) == 2  # 32 requests per message
    broker.purge(constants.QUEUE_BULK)
    assert broker.queued(constants.QUEUE_BULK) == 0
    env.start_worker(concurrency=2)
    wait_ok(env, job_id, timeout_s=60)
    lines = results_of(env, job_id)
    assert [line["results"] for line in lines] == [expected_results(r) for r in requests]
    assert standin.stats()["total"]["ok"] == 40  # each request ran exactly once
    assert "action=sweep_requeue priority=bulk requests=40" in env.all_logs()


@pytest.mark.parametrize("broker", ["amqp"], indirect=True)
def test_worker_reconnects_after_rabbitmq_cut_its_connection_and_the_job_completes(
    make_env: Any, broker: Broker, postgres_url: str, standin: ThreadedStandin, tmp_path: Path
) -> None:
    env: Env = make_env(postgres_url, api_keys(alpha=3, beta=2), **FAST_RECOVERY)
    standin.update(latency_ms=100)
    requests = make_requests(120)
    env.start_worker(concurrency=4, name="cut")
    job_id = submit(env, write_jsonl(tmp_path / "r.jsonl", requests))
    wait_for(lambda: standin.stats()["total"]["ok"] >= 10, 30, "the worker to be mid-job")
    broker.close_connections()
    wait_for(lambda: "Connection to broker lost" in env.all_logs(), 30, "the worker to see the cut")
    # Messages it held unacked went back to the queue; it consumes again once reconnected.
    later = make_requests(3)
    later_id = submit(env, write_jsonl(tmp_path / "later.jsonl", later))
    wait_ok(env, job_id, timeout_s=90)
    wait_ok(env, later_id, timeout_s=60)
    lines = results_of(env, job_id)
    assert [line["results"] for line in lines] == [expected_results(r) for r in requests]
    # Messages delivered again found their requests claimed in SQL: none ran twice.
    assert standin.stats()["total"]["ok"] == len(requests) + len(later)
    stats = standin.stats()["keys"]
    assert stats["alpha"]["max_in_flight"] <= 3 and stats["beta"]["max_in_flight"] <= 2
