"""Chaos run: one big job while workers are killed and Redis restarts, printed as figures.

Starts its own stand-in API (in a thread), its own Redis (no persistence, so a restart
loses every message, lease and pause) and a few `rerank-worker worker` processes, submits
a job of --requests requests, then SIGKILLs worker process groups and restarts Redis at
random moments in the first --duration-faults-s seconds. When the job has ended it prints
what was lost, doubled, over a key's limit or billed twice, and how long the job took to
finish after the last fault. Exit 0 when the job completed with nothing lost or doubled.

    python scripts/chaos.py [--requests 2000] [--workers 3] [--seed N]
        [--database-url postgresql+psycopg://postgres@127.0.0.1:5432/chaos]
        [--broker amqp://guest:guest@127.0.0.1:5672/VHOST]

With --broker, Celery's messages go through that broker (RabbitMQ) while the restarted
Redis keeps only the limits; a restart then loses leases and pauses but no message.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import heapq
import itertools
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis
from sqlalchemy import func, select

from worker import catalog, constants
from worker.db.models import Request, UpstreamCall
from worker.db.session import get_engine
from worker.embedded import find_redis_server
from worker.service import read
from worker.settings import Settings
from worker.standin import StandinConfig, run_in_thread
from worker.standin.scoring import rank

# Short recovery knobs, so a killed worker's requests and lost messages come back in seconds.
RECOVERY_ENV = {
    "RERANK_CALL_TIMEOUT_S": "5",
    "RERANK_REQUEST_LEASE_S": "10",
    "RERANK_SWEEP_INTERVAL_S": "1",
    "RERANK_DISPATCH_STALE_S": "5",
    "RERANK_BACKOFF_BASE_S": "0.05",
    "RERANK_BACKOFF_CAP_S": "1",
}
DOWNTIME_S = (0.5, 3.0)  # how long a killed worker or a stopped Redis stays away
POLL_S = 0.5
PROGRESS_EVERY_S = 5.0
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 15.0
READY_TIMEOUT_S = 60.0
CLI_TIMEOUT_S = 300.0
ENDED = ("completed", "cancelled", "failed")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=3, help="worker processes at a time")
    parser.add_argument("--concurrency", type=int, default=6, help="threads per worker")
    parser.add_argument(
        "--duration-faults-s", type=float, default=40, help="faults happen this long after submit"
    )
    parser.add_argument("--seed", type=int, default=None, help="default: a random one")
    parser.add_argument("--latency-ms", type=float, default=50, help="stand-in latency")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("RERANK_DATABASE_URL"),
        help="default: RERANK_DATABASE_URL, else a SQLite file in a temporary dir",
    )
    parser.add_argument("--keys", default="alpha@4,beta@3", help="NAME@LIMIT,...")
    parser.add_argument(
        "--broker",
        default=None,
        help="Celery broker URL (e.g. amqp://...); default: the run's own Redis",
    )
    parser.add_argument("--redis-restarts", type=int, default=2)
    parser.add_argument("--worker-kills", type=int, default=4)
    parser.add_argument(
        "--upstream-faults",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="5%% 5xx, 2%% 429 (retry after 0.3 s), 1%% dropped connections",
    )
    parser.add_argument(
        "--max-documents-per-call",
        type=int,
        default=_env_int("RERANK_MAX_DOCUMENTS_PER_CALL"),
        help="default: RERANK_MAX_DOCUMENTS_PER_CALL, else the model's own limit",
    )
    parser.add_argument("--timeout-s", type=float, default=600, help="give up on the job then")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.workers < 1 or args.concurrency < 1:
        parser.error("--requests, --workers and --concurrency must be at least 1")
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(2**31)
    try:
        args.limits = parse_limits(args.keys)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def parse_limits(spec: str) -> dict[str, int]:
    """`alpha@4,beta@3` -> {"alpha": 4, "beta": 3}."""
    limits: dict[str, int] = {}
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        name, at, limit = entry.partition("@")
        if not name or not at or not limit.isdigit() or int(limit) < 1:
            raise ValueError(f"--keys entry '{entry}': expected NAME@LIMIT with LIMIT >= 1")
        limits[name] = int(limit)
    if not limits:
        raise ValueError("--keys names no key")
    return limits


def make_requests(count: int, rng: random.Random) -> list[dict[str, Any]]:
    """Requests of 3-15 documents: strings, {"text"} and a few {"image"}; some with top_n."""
    requests = []
    for i in range(count):
        documents: list[Any] = []
        for j in range(rng.randint(3, 15)):
            kind = rng.random()
            if kind < 0.05:
                documents.append({"image": f"https://example.test/chaos/{i}/{j}.png"})
            elif kind < 0.4:
                documents.append(
                    {"text": f"passage {j} of request {i}, topic {rng.randint(0, 99)}"}
                )
            else:
                documents.append(f"document {j} for request {i}: {rng.random():.6f}")
        request: dict[str, Any] = {
            "custom_id": f"chaos-{i}",
            "query": f"chaos query {i}",
            "documents": documents,
        }
        if rng.random() < 0.3:
            request["top_n"] = rng.randint(1, 10)
        requests.append(request)
    return requests


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def cli(env: dict[str, str], *args: str) -> str:
    """stdout of a `rerank-worker` command that must succeed."""
    done = subprocess.run(
        [sys.executable, "-m", "worker", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"`rerank-worker {' '.join(args)}` failed: {done.stderr.strip()}")
    return done.stdout


class Clock:
    """Seconds since the job was submitted, for the event log on stderr."""

    def __init__(self) -> None:
        self.origin = time.monotonic()

    def log(self, message: str) -> None:
        print(f"[{time.monotonic() - self.origin:7.2f}s] {message}", file=sys.stderr, flush=True)


class RedisServer:
    """A redis-server of our own on a loopback port, without persistence."""

    def __init__(self, binary: str, directory: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._binary = binary
        self._directory = directory
        self._process: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def running(self) -> bool:
        return self._process is not None

    def start(self) -> None:
        args = [
            self._binary,
            *("--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self._directory)),
            *("--save", "", "--appendonly", "no", "--daemonize", "no"),
            *("--logfile", str(self._directory / "redis.log")),
        ]
        self._process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._answers():
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"redis-server did not start; see {self._directory}/redis.log")
            time.sleep(0.05)

    def stop(self) -> None:
        """SHUTDOWN NOSAVE: every queued message, slot lease and pause is gone."""
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)
        try:
            client.shutdown(nosave=True)
        except redis.exceptions.RedisError:
            pass  # it may close the connection before answering
        finally:
            client.close()
        self.close()

    def close(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            _end_group(process, signal.SIGTERM)

    def _answers(self) -> bool:
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
        try:
            return bool(client.ping())
        except redis.exceptions.RedisError:
            return False
        finally:
            client.close()


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)


def _reap(process: subprocess.Popen[bytes]) -> None:
    """Wait for the process to exit; SIGKILL its group if it has not in time."""
    try:
        process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _signal_group(process, signal.SIGKILL)
        process.wait(STOP_TIMEOUT_S)


def _end_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    _signal_group(process, sig)
    _reap(process)


class Workers:
    """`rerank-worker worker` processes, each the leader of its own process group."""

    def __init__(self, env: dict[str, str], concurrency: int, logs: Path) -> None:
        self._env = env
        self._concurrency = concurrency
        self._logs = logs
        self._names = itertools.count(1)
        self._running: dict[str, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()
        self._closed = False
        self.exited_by_themselves: list[str] = []

    def start(self) -> str | None:
        """Start one more worker; None once closed (a replacement due after the end)."""
        with self._lock:
            if self._closed:
                return None
            name = f"chaos-{next(self._names)}"
            command = [sys.executable, "-m", "worker", "worker", "-n", f"{name}@%h"]
            command += ["--concurrency", str(self._concurrency)]
            with self._log(name).open("wb") as log:
                self._running[name] = subprocess.Popen(
                    command,
                    env=self._env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            return name

    def wait_ready(self, timeout_s: float) -> None:
        """Until every running worker has logged Celery's "ready." line."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            waiting = dict(self._running)
        while waiting:
            for name, process in list(waiting.items()):
                if b" ready." in self._log(name).read_bytes():
                    del waiting[name]
                elif process.poll() is not None:
                    raise RuntimeError(f"worker {name} exited at start; see {self._log(name)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers {', '.join(waiting)} not ready in {timeout_s:g}s")
            time.sleep(0.1)

    def kill_one(self, rng: random.Random) -> str | None:
        """SIGKILL a random live worker's whole process group; None when none is alive."""
        with self._lock:
            self._forget_exited()
            if self._closed or not self._running:
                return None
            name = rng.choice(sorted(self._running))
            _end_group(self._running.pop(name), signal.SIGKILL)
            return name

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._forget_exited()
            processes, self._running = list(self._running.values()), {}
        for process in processes:  # all at once, so their warm shutdowns overlap
            _signal_group(process, signal.SIGTERM)
        for process in processes:
            _reap(process)

    def tracebacks(self) -> int:
        """Python tracebacks in every worker's log: crashes that nothing else shows."""
        return sum(
            p.read_bytes().count(b"Traceback (most recent call last)")
            for p in self._logs.glob("worker-*.log")
        )

    def _log(self, name: str) -> Path:
        return self._logs / f"worker-{name}.log"

    def _forget_exited(self) -> None:
        for name, process in list(self._running.items()):
            if process.poll() is not None:
                del self._running[name]
                self.exited_by_themselves.append(name)


class Chaos(threading.Thread):
    """Runs the fault schedule: worker kills (and their replacements), Redis restarts."""

    def __init__(
        self,
        *,
        rng: random.Random,
        window_s: float,
        worker_kills: int,
        redis_restarts: int,
        workers: Workers,
        redis_server: RedisServer,
        clock: Clock,
    ) -> None:
        super().__init__(name="chaos", daemon=True)
        self._rng = rng
        self._workers = workers
        self._redis = redis_server
        self._clock = clock
        self._stopping = threading.Event()
        self._sequence = itertools.count()
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        start = time.monotonic()
        for _ in range(worker_kills):
            self._at(start + rng.uniform(0, window_s), self._kill_worker)
        for _ in range(redis_restarts):
            self._at(start + rng.uniform(0, window_s), self._stop_redis)
        self.kills = 0
        self.redis_restarts = 0
        self.last_fault_at: dt.datetime | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while self._events and not self._stopping.is_set():
                due, _, action = self._events[0]
                if self._stopping.wait(max(0.0, due - time.monotonic())):
                    return
                heapq.heappop(self._events)
                action()
        except BaseException as exc:  # the main thread reports it and stops the run
            self.error = exc

    def stop(self) -> None:
        self._stopping.set()
        if self.is_alive():
            self.join(2 * START_TIMEOUT_S)

    def _at(self, due: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._events, (due, next(self._sequence), action))

    def _after_downtime(self, action: Callable[[], None]) -> None:
        self._at(time.monotonic() + self._rng.uniform(*DOWNTIME_S), action)

    def _fault_done(self) -> None:
        self.last_fault_at = dt.datetime.now(dt.UTC)

    def _kill_worker(self) -> None:
        name = self._workers.kill_one(self._rng)
        if name is None:  # every worker is down: try again once a replacement is up
            self._at(time.monotonic() + 0.5, self._kill_worker)
            return
        self._fault_done()
        self.kills += 1
        self._clock.log(f"fault: SIGKILL worker {name}")
        self._after_downtime(self._start_worker)

    def _start_worker(self) -> None:
        name = self._workers.start()
        if name is not None:
            self._clock.log(f"started replacement worker {name}")

    def _stop_redis(self) -> None:
        if not self._redis.running:  # still down from the last restart: come back later
            self._at(time.monotonic() + 0.5, self._stop_redis)
            return
        self._redis.stop()
        self._fault_done()
        self.redis_restarts += 1
        self._clock.log("fault: Redis SHUTDOWN NOSAVE")
        self._after_downtime(self._start_redis)

    def _start_redis(self) -> None:
        self._redis.start()
        self._clock.log("Redis is back (empty)")


def worker_env(
    args: argparse.Namespace,
    secrets: dict[str, str],
    database_url: str,
    redis_url: str,
    api_base: str,
    data_dir: Path,
) -> dict[str, str]:
    """This process's environment without RERANK_* settings, plus the run's own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RERANK_")}
    env.update(RECOVERY_ENV)
    env.update(
        RERANK_DATABASE_URL=database_url,
        RERANK_REDIS_URL=redis_url,
        RERANK_API_BASE=api_base,
        RERANK_API_KEYS=",".join(
            f"{name}={secrets[name]}@{limit}" for name, limit in args.limits.items()
        ),
        RERANK_DATA_DIR=str(data_dir),
    )
    if args.broker:
        env["RERANK_BROKER_URL"] = args.broker
    if args.max_documents_per_call:
        env["RERANK_MAX_DOCUMENTS_PER_CALL"] = str(args.max_documents_per_call)
    return env


def wait_for_job(
    job_id: str, settings: Settings, chaos: Chaos, clock: Clock, timeout_s: float
) -> dict[str, Any]:
    """Poll SQL until the job ends or the deadline passes; the last status seen."""
    deadline = time.monotonic() + timeout_s
    next_progress = time.monotonic()
    while True:
        if chaos.error is not None:
            raise RuntimeError("the fault thread failed") from chaos.error
        info = read.job_status(job_id, settings)
        if info["status"] in ENDED or time.monotonic() > deadline:
            return info
        if time.monotonic() >= next_progress:
            clock.log(
                f"job {info['status']}: {info['succeeded']} succeeded, {info['failed']} failed, "
                f"{info['pending']} pending"
            )
            next_progress += PROGRESS_EVERY_S
        time.sleep(POLL_S)


def shown_broker(url: str | None) -> str:
    """The broker without its credentials."""
    if not url:
        return "the run's Redis"
    parts = urlsplit(url)
    host = f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)
    return parts._replace(netloc=host).geturl()


def sql_figures(database_url: str, job_id: str) -> dict[str, int]:
    """What SQL recorded: duplicate request rows and the upstream calls of the job."""
    with get_engine(database_url).connect() as connection:
        per_custom_id = (
            select(func.count().label("rows"))
            .where(Request.job_id == job_id)
            .group_by(Request.custom_id)
            .subquery()
        )
        extra_rows = connection.scalar(select(func.coalesce(func.sum(per_custom_id.c.rows - 1), 0)))
        calls = UpstreamCall.job_id == job_id
        recorded = connection.scalar(select(func.count()).where(calls))
        recorded_ok = connection.scalar(
            select(func.count()).where(calls, UpstreamCall.outcome == "ok")
        )
        tokens = connection.scalar(
            select(func.coalesce(func.sum(UpstreamCall.total_tokens), 0)).where(calls)
        )
    return {
        "extra_request_rows": int(extra_rows or 0),
        "recorded_calls": int(recorded or 0),
        "recorded_ok": int(recorded_ok or 0),
        "tokens": int(tokens or 0),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rng = random.Random(args.seed)
    requests = make_requests(args.requests, rng)
    work = Path(tempfile.mkdtemp(prefix="rerank-chaos-"))
    database_url = args.database_url or f"sqlite:///{work / 'rerank.db'}"
    path = work / "requests.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in requests))
    secrets = {name: f"sk-chaos-{name}-{args.seed}-0123456789" for name in args.limits}
    config = StandinConfig(keys=secrets, latency_ms=args.latency_ms, seed=args.seed)
    if args.upstream_faults:
        config = config.with_changes(
            fault_5xx=0.05, fault_429=0.02, fault_drop=0.01, retry_after_s=0.3, pause_grace_ms=100
        )
    print(f"chaos run in {work} (seed {args.seed})", file=sys.stderr, flush=True)

    with contextlib.ExitStack() as stack:
        standin = stack.enter_context(run_in_thread(config))
        redis_server = RedisServer(find_redis_server(), work / "redis")
        stack.callback(redis_server.close)
        redis_server.start()
        env = worker_env(
            args, secrets, database_url, redis_server.url, standin.base_url, work / "data"
        )
        # Also for SQLite: workers that migrate a new file at the same moment can collide.
        cli(env, "db", "upgrade")
        workers = Workers(env, args.concurrency, work)
        stack.callback(workers.close)
        for _ in range(args.workers):
            workers.start()
        workers.wait_ready(READY_TIMEOUT_S)
        clock = Clock()
        submitted_at = dt.datetime.now(dt.UTC)
        job_id = cli(env, "submit", str(path)).strip().splitlines()[-1]
        clock.log(f"submitted job {job_id}: {len(requests)} requests")
        chaos = Chaos(
            rng=rng,
            window_s=args.duration_faults_s,
            worker_kills=args.worker_kills,
            redis_restarts=args.redis_restarts,
            workers=workers,
            redis_server=redis_server,
            clock=clock,
        )
        stack.callback(chaos.stop)
        chaos.start()
        settings = Settings(database_url=database_url)  # type: ignore[call-arg]
        info = wait_for_job(job_id, settings, chaos, clock, args.timeout_s)
        waited_at = dt.datetime.now(dt.UTC)
        chaos.stop()
        clock.log(f"job {info['status']}")
        lines = [json.loads(x) for x in cli(env, "results", job_id).splitlines()]
        workers.close()  # before reading the stand-in's counters, so none is in flight
        stats = standin.stats()
    recorded = sql_figures(database_url, job_id)

    completed = info["status"] == "completed"
    # A job still running at the deadline has no end: its wall time is the time waited.
    ended_at = dt.datetime.fromisoformat(info["finished_at"]) if info["finished_at"] else waited_at
    by_id = Counter(line["custom_id"] for line in lines)
    pending = sum(line["status"] == "pending" for line in lines)
    lost = sum(r["custom_id"] not in by_id for r in requests) + pending
    doubled = sum(n - 1 for n in by_id.values() if n > 1) + recorded["extra_request_rows"]
    expected = {
        r["custom_id"]: rank(r["query"], r["documents"], r.get("top_n"), False)[0] for r in requests
    }
    exact = sum(line["results"] == expected.get(line["custom_id"]) for line in lines)
    failures = Counter(line["error"]["type"] for line in lines if line["status"] == "failed")
    per_call = catalog.max_documents_per_call(constants.DEFAULT_MODEL, args.max_documents_per_call)
    needed = sum(math.ceil(len(r["documents"]) / per_call) for r in requests)
    total = stats["total"]
    violations = sum(
        max(0, stats["keys"][name]["max_in_flight"] - limit) for name, limit in args.limits.items()
    )

    recovery: float | str = "-"
    if completed and chaos.last_fault_at is not None:
        recovery = round((ended_at - chaos.last_fault_at).total_seconds(), 2)
    figures: dict[str, Any] = {
        "seed": args.seed,
        "broker": shown_broker(args.broker),
        "job status": info["status"],
        "requests": len(requests),
        "succeeded": sum(line["status"] == "succeeded" for line in lines),
        "failed": ", ".join(f"{n} {kind}" for kind, n in failures.items()) or 0,
        "lost (missing or still pending)": lost,
        "doubled (results lines + request rows)": doubled,
        "rankings exactly as the API gave them": exact,
        **{
            f"max in flight {name} (limit {limit})": stats["keys"][name]["max_in_flight"]
            for name, limit in args.limits.items()
        },
        "limit violations (calls over a limit)": violations,
        "calls inside a 429 pause": total["calls_during_pause"],
        "upstream calls (stand-in)": total["calls"],
        "upstream calls recorded in SQL": recorded["recorded_calls"],
        "billed calls (stand-in 200)": total["ok"],
        "billed calls recorded in SQL": recorded["recorded_ok"],
        "extra billed calls (not recorded)": total["ok"] - recorded["recorded_ok"],
        "minimum calls needed": needed,
        "billed calls beyond the minimum": total["ok"] - needed,
        "tokens billed by the API": total["tokens_billed"],
        "tokens in usage": recorded["tokens"],
        "worker kills (done of planned)": f"{chaos.kills} of {args.worker_kills}",
        "Redis restarts (done of planned)": f"{chaos.redis_restarts} of {args.redis_restarts}",
        "workers that exited by themselves": len(workers.exited_by_themselves),
        "tracebacks in worker logs": workers.tracebacks(),
        "wall time from submit to end (s)": round((ended_at - submitted_at).total_seconds(), 2),
        "time to recover after the last fault (s)": recovery,
    }
    width = max(map(len, figures))
    for name, value in figures.items():
        print(f"{name:<{width}}  {value}")
    return 0 if completed and lost == 0 and doubled == 0 else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
