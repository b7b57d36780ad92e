"""Completion notifications on real parts: a webhook receiver on a port, real workers, the
stand-in, Redis, SQLite and PostgreSQL, and a Celery app of a producer's own."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import Env, Receiver, wait_for
from jobs_support import make_requests, submit, wait_ok, write_jsonl
from standardwebhooks import Webhook

from worker.service import read

SECRET = "whsec_" + base64.b64encode(b"a deployment secret of 32 bytes!").decode()
# Fast retries for tests; the default is Svix's (5 s, 5 min, 30 min, ...).
FAST = {
    "RERANK_WEBHOOK_ALLOW_PRIVATE": "true",
    "RERANK_WEBHOOK_SECRET": SECRET,
    "RERANK_WEBHOOK_RETRY_SCHEDULE_S": "0.5,1",
    "RERANK_WEBHOOK_POLL_INTERVAL_S": "0.2",
}


def notifications(job_id: str) -> list[dict[str, Any]]:
    return read.job_notifications(job_id)


def notification_in(job_id: str, status: str, attempts: int | None = None) -> bool:
    rows = notifications(job_id)
    return bool(rows) and all(
        n["status"] == status and (attempts is None or n["attempts"] == attempts) for n in rows
    )


def small_job(env: Env, tmp_path: Path, *args: str, count: int = 5) -> str:
    path = write_jsonl(tmp_path / "requests.jsonl", make_requests(count))
    return submit(env, path, *args)


def test_webhook_is_signed_and_retried_with_one_id_until_a_2xx(
    make_env: Any, database_url: str, receiver: Receiver, tmp_path: Path
) -> None:
    """500, 500, then 204: three deliveries, one webhook-id, the same bytes, each verified."""
    env: Env = make_env(database_url, **FAST)
    receiver.answers = [500, 500]
    env.start_worker(concurrency=4)

    job_id = small_job(env, tmp_path, "--webhook-url", receiver.url)
    wait_ok(env, job_id)
    wait_for(lambda: notification_in(job_id, "delivered"), 30, "the webhook to be delivered")

    assert len(receiver.deliveries) == 3
    assert len(set(receiver.ids())) == 1 and receiver.ids()[0].startswith("msg_")
    assert len({d.body for d in receiver.deliveries}) == 1
    for delivery in receiver.deliveries:
        payload = Webhook(SECRET).verify(delivery.body, delivery.headers)
    assert payload["type"] == "job.completed"
    assert payload["timestamp"].startswith(payload["data"]["finished_at"][:19])
    data = payload["data"]
    assert (data["id"], data["status"], data["total"], data["succeeded"]) == (
        job_id, "completed", 5, 5,
    )  # fmt: skip
    assert data["usage"]["total_tokens"] > 0 and "notifications" not in data

    shown = env.cli("webhooks", job_id, "--json")
    assert shown.returncode == 0, shown.stderr
    (row,) = json.loads(shown.stdout)
    assert (row["id"], row["kind"], row["event"], row["status"], row["attempts"]) == (
        receiver.ids()[0], "webhook", "job.completed", "delivered", 3,
    )  # fmt: skip
    assert [a["status_code"] for a in row["attempt_log"]] == [500, 500, 204]
    assert row["last_status_code"] == 204 and row["delivered_at"]
    status = json.loads(env.cli("status", job_id, "--json").stdout)
    assert [(n["status"], n["attempts"]) for n in status["notifications"]] == [("delivered", 3)]
    assert env.cli("webhooks", job_id).returncode == 0
    assert SECRET.removeprefix("whsec_") not in env.all_logs()

    # A job that asked for nothing gets no notification.
    quiet = small_job(env, tmp_path, count=2)
    wait_ok(env, quiet)
    assert json.loads(env.cli("webhooks", quiet, "--json").stdout) == []
    assert len(receiver.deliveries) == 3


def test_a_retry_due_when_its_worker_is_killed_is_sent_by_the_next_worker(
    make_env: Any, database_url: str, receiver: Receiver, tmp_path: Path
) -> None:
    # The retry is due 5 s after the first attempt: the first worker is dead by then.
    env: Env = make_env(database_url, **{**FAST, "RERANK_WEBHOOK_RETRY_SCHEDULE_S": "5"})
    receiver.answers = [503]
    first = env.start_worker(concurrency=4, name="first")
    job_id = small_job(env, tmp_path, "--webhook-url", receiver.url)
    wait_for(lambda: notification_in(job_id, "pending", attempts=1), 60, "the first attempt")
    env.kill_worker(first)
    assert len(receiver.deliveries) == 1

    env.start_worker(concurrency=4, name="second")
    wait_for(lambda: notification_in(job_id, "delivered"), 30, "the retry to be delivered")
    assert len(receiver.deliveries) == 2 and len(set(receiver.ids())) == 1
    for delivery in receiver.deliveries:
        Webhook(SECRET).verify(delivery.body, delivery.headers)


def test_a_worker_killed_mid_attempt_leaves_a_lease_that_runs_out(
    make_env: Any, database_url: str, receiver: Receiver, tmp_path: Path
) -> None:
    """The receiver holds the first POST while its worker is killed: the notification stays
    leased to the dead worker until the lease runs out, and then another worker sends it."""
    env: Env = make_env(
        database_url, **FAST, RERANK_WEBHOOK_TIMEOUT_S="2", RERANK_WEBHOOK_LEASE_S="4"
    )
    receiver.hold = threading.Event()
    first = env.start_worker(concurrency=4, name="first")
    job_id = small_job(env, tmp_path, "--webhook-url", receiver.url)
    wait_for(lambda: receiver.deliveries, 60, "the first attempt to arrive")
    env.kill_worker(first)
    receiver.hold.set()
    assert notification_in(job_id, "delivering", attempts=1)

    env.start_worker(concurrency=4, name="second")
    wait_for(lambda: notification_in(job_id, "delivered"), 30, "the lease to run out and a resend")
    assert len(receiver.deliveries) == 2 and len(set(receiver.ids())) == 1
    (row,) = notifications(job_id)
    # The dead worker never told how its attempt went; the second one is logged.
    assert [(a["attempt"], a["status_code"]) for a in row["attempt_log"]] == [(2, 204)]


def test_a_cancelled_job_sends_job_cancelled(
    make_env: Any, database_url: str, receiver: Receiver, tmp_path: Path
) -> None:
    env: Env = make_env(database_url, **FAST)
    job_id = small_job(env, tmp_path, "--webhook-url", receiver.url)  # no worker runs it yet
    assert env.cli("cancel", job_id).returncode == 0
    assert notification_in(job_id, "pending", attempts=0)

    env.start_worker(concurrency=4)
    wait_for(lambda: notification_in(job_id, "delivered"), 30, "the webhook to be delivered")
    (delivery,) = receiver.deliveries
    payload = Webhook(SECRET).verify(delivery.body, delivery.headers)
    assert payload["type"] == "job.cancelled"
    assert (payload["data"]["status"], payload["data"]["cancelled"]) == ("cancelled", 5)


def test_private_webhook_urls_and_bad_callbacks_are_refused_at_submit(
    make_env: Any, database_url: str, receiver: Receiver, tmp_path: Path
) -> None:
    """Exit 2 naming the option, and no job stored."""
    path = write_jsonl(tmp_path / "requests.jsonl", make_requests(2))
    env: Env = make_env(database_url, RERANK_WEBHOOK_SECRET=SECRET)
    refused = env.cli("submit", str(path), "--webhook-url", receiver.url)
    assert refused.returncode == 2, refused.stderr
    assert "webhook_url" in refused.stderr and "127.0.0.1" in refused.stderr

    for bad in (
        ("--webhook-url", "ftp://example.test/x"),
        ("--on-complete", "not a task name"),
        ("--on-complete", "app.done", "--on-complete-queue", "bad queue"),
    ):
        done = env.cli("submit", str(path), *bad)
        assert done.returncode == 2, (bad, done.stderr)
    no_secret: Env = make_env(database_url, RERANK_WEBHOOK_ALLOW_PRIVATE="true")
    done = no_secret.cli("submit", str(path), "--webhook-url", receiver.url)
    assert done.returncode == 2 and "RERANK_WEBHOOK_SECRET" in done.stderr
    assert json.loads(env.cli("jobs", "--json").stdout) == []

    allowed: Env = make_env(database_url, **FAST)
    job_id = submit(allowed, path, "--webhook-url", receiver.url)
    assert json.loads(allowed.cli("jobs", "--json").stdout)[0]["id"] == job_id


CALLBACK_APP = """
import json, os
from celery import Celery

app = Celery("producer", broker=os.environ["BROKER"])
app.conf.update(task_ignore_result=True, worker_hijack_root_logger=False)


@app.task(name="producer.tasks.job_done", bind=True)
def job_done(self, job_id, status):
    import redis
    redis.Redis.from_url(os.environ["BROKER"]).rpush(
        "producer:callbacks", json.dumps([job_id, status, self.request.id])
    )
"""


@pytest.fixture
def callback_worker(tmp_path: Path, redis_url: str) -> Iterator[subprocess.Popen[bytes]]:
    """A producer's own Celery app, in its own process, consuming queue `celery`."""
    app_dir = tmp_path / "producer"
    app_dir.mkdir()
    (app_dir / "callback_app.py").write_text(CALLBACK_APP)
    log_path = tmp_path / "producer.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RERANK_")}
    env.update(BROKER=redis_url, PYTHONPATH=str(app_dir))
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "callback_app", "worker", "--pool=solo",
             "--queues=celery", "--without-gossip", "--without-mingle", "--loglevel=INFO"],
            env=env, cwd=app_dir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_for(lambda: b" ready." in log_path.read_bytes(), 60, "the producer's worker")
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def test_the_celery_callback_arrives_once_beside_the_webhook(
    make_env: Any,
    database_url: str,
    receiver: Receiver,
    tmp_path: Path,
    redis_client: redis.Redis,
    callback_worker: subprocess.Popen[bytes],
) -> None:
    env: Env = make_env(database_url, **FAST)
    env.start_worker(concurrency=4)
    job_id = small_job(
        env, tmp_path, "--on-complete", "producer.tasks.job_done", "--webhook-url", receiver.url
    )
    wait_ok(env, job_id)
    wait_for(lambda: notification_in(job_id, "delivered"), 30, "both notifications")
    wait_for(lambda: redis_client.llen("producer:callbacks"), 30, "the callback to run")
    wait_for(lambda: redis_client.llen("celery") == 0, 30, "the callback queue to drain")

    calls = [json.loads(raw) for raw in redis_client.lrange("producer:callbacks", 0, -1)]
    celery_row = next(n for n in notifications(job_id) if n["kind"] == "celery")
    assert calls == [[job_id, "completed", celery_row["id"]]]
    assert (celery_row["target"], celery_row["queue"], celery_row["attempts"]) == (
        "producer.tasks.job_done", "celery", 1,
    )  # fmt: skip
    assert len(receiver.deliveries) == 1
