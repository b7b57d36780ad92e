"""Workers on separate hosts: each worker host is a network namespace of its own, joined to
the services host (this test's namespace, holding its own Redis, PostgreSQL and the stand-in)
by a veth pair. Cutting a host takes its link down while its processes stay alive.

Made and removed by the test; skipped where `ip netns add` is not allowed (not root, or a
container without CAP_SYS_ADMIN / CAP_NET_ADMIN).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import SECRETS, Env, OwnPostgres, OwnRedis, api_keys, free_port, wait_for
from jobs_support import expected_results, make_requests, results_of, submit, wait_ok, write_jsonl
from own_postgres import started_cluster
from sqlalchemy import select

from worker.db import migrate
from worker.db.models import Request
from worker.db.session import get_engine
from worker.standin import StandinConfig, run_in_thread

LEASE_S = 4.0
HOST_ENV = {
    "RERANK_REQUEST_LEASE_S": str(LEASE_S),
    "RERANK_SWEEP_INTERVAL_S": "0.5",
    "RERANK_DISPATCH_STALE_S": "3",
    "RERANK_CALL_TIMEOUT_S": "3",
    "RERANK_BACKOFF_BASE_S": "0.02",
    "RERANK_BACKOFF_CAP_S": "0.5",
}
_numbers = itertools.count(1)


def ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise AssertionError(f"ip {' '.join(args)} failed: {done.stderr}")


def netns_refused() -> str | None:
    """Why this machine cannot make network namespaces, or None when it can."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    probe = f"rwprobe{os.getpid() % 100000}"
    done = subprocess.run(
        ["ip", "netns", "add", probe], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        return f"`ip netns add` is not permitted here: {done.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True, check=False)
    return None


@dataclass
class Host:
    """A worker host: a namespace and the veth pair that is its only link."""

    name: str
    services_ip: str  # the services host, as this host reaches it
    address: str

    @property
    def outside(self) -> str:
        return f"{self.name}o"

    @property
    def via(self) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.name)

    def cut(self) -> None:
        ip("link", "set", self.outside, "down")

    def restore(self) -> None:
        ip("link", "set", self.outside, "up")


@pytest.fixture
def hosts() -> Iterator[Callable[[], Host]]:
    refused = netns_refused()
    if refused:
        pytest.skip(refused)
    made: list[Host] = []
    subnet = 10 + os.getpid() % 200

    def make() -> Host:
        n = next(_numbers)
        host = Host(
            name=f"rw{os.getpid() % 100000}h{n}",
            services_ip=f"10.213.{subnet}.{4 * n + 1}",
            address=f"10.213.{subnet}.{4 * n + 2}",
        )
        ip("netns", "add", host.name)
        made.append(host)
        inside = f"{host.name}i"
        ip("link", "add", host.outside, "type", "veth", "peer", "name", inside)
        ip("link", "set", inside, "netns", host.name)
        ip("addr", "add", f"{host.services_ip}/30", "dev", host.outside)
        ip("link", "set", host.outside, "up")
        ip("-n", host.name, "addr", "add", f"{host.address}/30", "dev", inside)
        ip("-n", host.name, "link", "set", inside, "up")
        ip("-n", host.name, "link", "set", "lo", "up")
        return host

    yield make
    for host in made:
        pids = subprocess.run(
            ["ip", "netns", "pids", host.name], capture_output=True, text=True, check=False
        ).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), 9)
        subprocess.run(["ip", "link", "delete", host.outside], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "delete", host.name], capture_output=True, check=False)


@pytest.fixture
def services_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    directory = tmp_path / "services-redis"
    directory.mkdir()
    server = OwnRedis(directory, free_port(), bind="0.0.0.0")
    server.start(persist=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def services_postgres() -> Iterator[OwnPostgres]:
    with started_cluster(free_port(), listen="*", trust=["10.213.0.0/16"]) as server:
        try:
            migrate.upgrade(server.url)
            yield server
        finally:
            get_engine(server.url).dispose()


def taken_over(url: str, job_id: str) -> int:
    """Requests claimed more than once: the cut host's, run again by the other."""
    with get_engine(url).connect() as connection:
        return len(
            connection.execute(
                select(Request.id).where(Request.job_id == job_id, Request.deliveries > 1)
            ).all()
        )


def finished_at(url: str, job_id: str) -> dict[int, Any]:
    with get_engine(url).connect() as connection:
        rows = connection.execute(
            select(Request.id, Request.finished_at).where(Request.job_id == job_id)
        )
        return {request_id: finished for request_id, finished in rows}


def test_a_host_cut_off_mid_job_is_finished_by_the_others_and_its_late_work_is_fenced(
    hosts: Callable[[], Host],
    services_redis: OwnRedis,
    services_postgres: OwnPostgres,
    make_env: Any,
    tmp_path: Path,
) -> None:
    cut, other = hosts(), hosts()
    standin = run_in_thread(StandinConfig(keys=dict(SECRETS), latency_ms=250, seed=7), "0.0.0.0")
    try:
        port = standin.port

        def seen_from(host: Host | None) -> Env:
            at = host.services_ip if host else "127.0.0.1"
            return make_env(  # type: ignore[no-any-return]
                services_postgres.url.replace("127.0.0.1", at),
                api_keys(alpha=3, beta=2),
                RERANK_REDIS_URL=services_redis.url.replace("127.0.0.1", at),
                RERANK_API_BASE=f"http://{at}:{port}",
                **HOST_ENV,
            )

        here, on_cut, on_other = seen_from(None), seen_from(cut), seen_from(other)
        on_cut.start_worker(concurrency=4, name="cut", via=cut.via)
        on_other.start_worker(concurrency=4, name="other", via=other.via)
        requests = make_requests(90)
        job_id = submit(here, write_jsonl(tmp_path / "r.jsonl", requests))
        wait_for(lambda: standin.stats()["total"]["ok"] >= 15, 60, "both hosts to be mid-job")

        cut.cut()
        cut_at = time.monotonic()
        try:
            wait_ok(here, job_id, timeout_s=120)  # while the cut host is still away
        except AssertionError as exc:
            hosts_logs = on_other.all_logs()[-6000:] + on_cut.all_logs()[-3000:]
            raise AssertionError(f"{exc}\nthe hosts' workers:\n{hosts_logs}") from None
        finished_in_s = time.monotonic() - cut_at
        stats = standin.stats()
        assert stats["keys"]["alpha"]["max_in_flight"] <= 3
        assert stats["keys"]["beta"]["max_in_flight"] <= 2
        lines = results_of(here, job_id)
        assert [line["results"] for line in lines] == [expected_results(r) for r in requests]
        written = finished_at(services_postgres.url, job_id)
        assert taken_over(services_postgres.url, job_id) > 0, "the cut host held nothing"

        # Back again: what it still held runs to its end there (a warm shutdown waits for
        # it to be written), and none of it is written over the results the other host
        # wrote, nor counted twice. (A call billed while its answer was cut off is lost to
        # the cut host for good, so usage may be below the upstream's bill, never above.)
        cut.restore()
        on_cut.stop_workers()
        usage = json.loads(here.cli("usage", "--job", job_id, "--json").stdout)
        assert 0 < usage["total_tokens"] <= standin.stats()["total"]["tokens_billed"]
        assert finished_at(services_postgres.url, job_id) == written
        assert [line["results"] for line in results_of(here, job_id)] == [
            expected_results(r) for r in requests
        ]
        stats = standin.stats()
        assert stats["keys"]["alpha"]["max_in_flight"] <= 3
        assert stats["keys"]["beta"]["max_in_flight"] <= 2
        assert finished_in_s < 100, finished_in_s
    finally:
        standin.close()
