"""Benchmarks of rerank-worker against the stand-in API, printed as one table.

    python scripts/bench.py                 # every target at the issue's sizes (minutes)
    python scripts/bench.py --only throughput --requests 4000

Each target owns what it starts: a stand-in API process (4 keys x 8 slots, 100 ms), a
redis-server on a free port, and a PostgreSQL database created on RERANK_BENCH_PG
(default postgresql://postgres@127.0.0.1:5432/postgres) and dropped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg

from worker import embedded

PG_ADMIN = os.environ.get("RERANK_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
KEYS = {f"k{i}": f"sk-bench-{i}-{uuid.uuid4().hex[:12]}" for i in range(1, 5)}
SLOTS_PER_KEY = 8
LATENCY_MS = 100.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its live children, from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pids = [pid]
    with contextlib.suppress(FileNotFoundError):
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(c) for c in children]
    for p in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


@dataclass
class Services:
    standin_url: str
    redis_url: str
    database_url: str
    workdir: Path
    standin: subprocess.Popen[bytes]

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RERANK_")}
        env.update(
            RERANK_API_BASE=self.standin_url,
            RERANK_API_KEYS=",".join(f"{n}={s}@{SLOTS_PER_KEY}" for n, s in KEYS.items()),
            RERANK_REDIS_URL=self.redis_url,
            RERANK_DATABASE_URL=self.database_url,
            RERANK_DATA_DIR=str(self.workdir / "data"),
            RERANK_LOG_LEVEL="WARNING",
            **extra,
        )
        return env

    def stats(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.standin_url}/_standin/stats").json())

    def reset(self) -> None:
        httpx.post(f"{self.standin_url}/_standin/reset")


@contextlib.contextmanager
def services(latency_ms: float = LATENCY_MS) -> Iterator[Services]:
    workdir = Path(tempfile.mkdtemp(prefix="rerank-bench-"))
    port_file = workdir / "standin.port"
    keys = ",".join(f"{n}={s}" for n, s in KEYS.items())
    standin = subprocess.Popen(
        [sys.executable, "-m", "worker.standin", "--port", "0", "--port-file", str(port_file),
         "--keys", keys, "--latency-ms", str(latency_ms)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    redis_port = free_port()
    redis = subprocess.Popen(
        [embedded.find_redis_server(), "--port", str(redis_port), "--bind", "127.0.0.1",
         "--save", "", "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    db_name = f"rerank_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{db_name}"')
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    try:
        deadline = time.monotonic() + 20
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.monotonic() > deadline:
                raise RuntimeError("the stand-in did not start")
            time.sleep(0.05)
        found = Services(
            standin_url=f"http://127.0.0.1:{port_file.read_text().strip()}",
            redis_url=f"redis://127.0.0.1:{redis_port}/0",
            database_url=f"{base}/{db_name}",
            workdir=workdir,
            standin=standin,
        )
        subprocess.run(
            [sys.executable, "-m", "worker", "db", "upgrade"], env=found.env(), check=True,
            capture_output=True,
        )  # fmt: skip
        yield found
    finally:
        for process in (standin, redis):
            process.terminate()
            process.wait(timeout=10)
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')


class InFlightSampler:
    """Samples the stand-in's calls in flight (a diagnostic: how full the slots are)."""

    def __init__(self, svc: Services) -> None:
        self._svc = svc
        self._samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self._samples.append(self._svc.stats()["total"]["in_flight"])

    def __enter__(self) -> InFlightSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def mean(self) -> float:
        busy = [s for s in self._samples]
        return round(sum(busy) / len(busy), 1) if busy else 0.0


def write_requests(path: Path, count: int, docs: int, seed: int = 1) -> None:
    rng = random.Random(seed)
    with path.open("w") as out:
        for i in range(count):
            documents = [f"doc {j} of {i}: {rng.random():.8f}" for j in range(docs)]
            out.write(json.dumps({"custom_id": f"r{i}", "query": f"q {i}", "documents": documents}))
            out.write("\n")


def cli(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        env=env,
        capture_output=True,
        text=True,
        check=check,
    )


@contextlib.contextmanager
def worker(env: dict[str, str], *extra: str) -> Iterator[subprocess.Popen[bytes]]:
    log = (Path(env["RERANK_DATA_DIR"]).parent / "worker.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "worker", "worker", *extra], env=env, stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        yield process
    finally:
        process.terminate()
        process.wait(timeout=60)


def wait_job(env: dict[str, str], job_id: str, timeout_s: float = 900) -> dict[str, Any]:
    """Poll the job's status in SQL from this process (a CLI per poll would eat a core)."""
    from worker.service import job_status
    from worker.settings import Settings

    settings = Settings(database_url=env["RERANK_DATABASE_URL"])
    deadline = time.monotonic() + timeout_s
    while True:
        status = job_status(job_id, settings)
        if status["status"] in ("completed", "cancelled", "failed"):
            return dict(status)
        if time.monotonic() > deadline:
            raise RuntimeError(f"job {job_id} not done after {timeout_s}s: {status}")
        time.sleep(0.1)


def bench_throughput(requests: int, docs: int, worker_args: list[str]) -> dict[str, Any]:
    """One `rerank-worker worker` at default settings; submit start to completed."""
    with services() as svc:
        env = svc.env()
        path = svc.workdir / "requests.jsonl"
        write_requests(path, requests, docs)
        with worker(env, *worker_args) as process:
            time.sleep(3)  # let the worker connect before the clock starts
            cpu_before = cpu_s(process.pid)
            started = time.monotonic()
            job_id = cli(env, "submit", str(path)).stdout.strip().splitlines()[-1]
            with InFlightSampler(svc) as sampler:
                status = wait_job(env, job_id)
            elapsed_s = time.monotonic() - started
            cpu = cpu_s(process.pid) - cpu_before
        calls = svc.stats()["total"]["ok"]
    limit = len(KEYS) * SLOTS_PER_KEY / (LATENCY_MS / 1000)
    return {
        "requests": requests,
        "succeeded": status["succeeded"],
        "elapsed_s": round(elapsed_s, 1),
        "calls_per_s": round(calls / elapsed_s, 1),
        "percent_of_limit": round(100 * calls / elapsed_s / limit, 1),
        "worker_cpu_ms_per_call": round(1000 * cpu / calls, 3),
        "mean_calls_in_flight": sampler.mean(),
    }


async def _bare(base_url: str, calls: int, docs: int) -> None:
    limits = {name: asyncio.Semaphore(SLOTS_PER_KEY) for name in KEYS}
    names = list(KEYS)
    async with httpx.AsyncClient(
        base_url=base_url, limits=httpx.Limits(max_connections=64, max_keepalive_connections=64)
    ) as client:

        async def one(i: int) -> None:
            name = names[i % len(names)]
            body = {
                "model": "jina-reranker-m0",
                "query": f"q {i}",
                "documents": [f"doc {j} of {i}" for j in range(docs)],
                "return_documents": False,
            }
            async with limits[name]:
                response = await client.post(
                    "/jina/v1/rerank", json=body, headers={"authorization": f"Bearer {KEYS[name]}"}
                )
                response.raise_for_status()

        await asyncio.gather(*(one(i) for i in range(calls)))


def bench_bare(calls: int, docs: int) -> dict[str, Any]:
    """The floor: asyncio + httpx with one semaphore per key, no queue, no database."""
    with services() as svc:
        usage_before = resource.getrusage(resource.RUSAGE_SELF)
        started = time.monotonic()
        asyncio.run(_bare(svc.standin_url, calls, docs))
        elapsed_s = time.monotonic() - started
        usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime - usage_before.ru_utime - usage_before.ru_stime
    limit = len(KEYS) * SLOTS_PER_KEY / (LATENCY_MS / 1000)
    return {
        "calls": calls,
        "elapsed_s": round(elapsed_s, 1),
        "calls_per_s": round(calls / elapsed_s, 1),
        "percent_of_limit": round(100 * calls / elapsed_s / limit, 1),
        "cpu_ms_per_call": round(1000 * cpu / calls, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=["throughput", "bare"], action="append")
    parser.add_argument("--requests", type=int, default=16_000)
    parser.add_argument("--docs", type=int, default=10)
    parser.add_argument("--worker-args", default="", help="extra arguments for the worker")
    args = parser.parse_args()
    chosen = args.only or ["bare", "throughput"]
    rows: list[tuple[str, dict[str, Any]]] = []
    if "bare" in chosen:
        rows.append(("bare asyncio+httpx client", bench_bare(args.requests, args.docs)))
    if "throughput" in chosen:
        rows.append(
            (
                "rerank-worker, 1 worker",
                bench_throughput(args.requests, args.docs, args.worker_args.split()),
            )
        )
    for name, figures in rows:
        print(f"{name}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
