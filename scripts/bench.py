"""Benchmarks of rerank-worker against the stand-in API, printed as one table.

    python scripts/bench.py                 # every target at the issue's sizes (minutes)
    python scripts/bench.py --only throughput --requests 4000
    python scripts/bench.py --only ingest --only export
    python scripts/bench.py --only upload --corpus-docs 1000000

Each target owns what it starts: a stand-in API process (4 keys x 8 slots, 100 ms), a
redis-server on a free port, and a PostgreSQL database created on RERANK_BENCH_PG
(default postgresql://postgres@127.0.0.1:5432/postgres) and dropped afterwards.

A target is a function that returns table rows (a name and a dict of figures); it is listed
in TARGETS. A figure's column comes from COLUMNS, or is added at the end when it is new.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime as dt
import functools
import json
import os
import random
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
from rich.console import Console
from rich.table import Table
from sqlalchemy import func, select

from worker import constants, embedded
from worker.db.base import utcnow
from worker.db.models import Job, Request, UpstreamCall
from worker.db.session import get_sessionmaker
from worker.settings import Settings, get_settings
from worker.standin.scoring import rank

# The cluster maker of the tests (tests/ is no package).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from own_postgres import started_cluster

PG_ADMIN = os.environ.get("RERANK_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
KEYS = {f"k{i}": f"sk-bench-{i}-{uuid.uuid4().hex[:12]}" for i in range(1, 5)}
SLOTS_PER_KEY = 8
LATENCY_MS = 100.0
# The yardstick the worker is measured against (see _bare_per_slot).
REFERENCE = "bare client: a pool per key, a sender per slot (reference)"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def process_tree(pid: int) -> list[int]:
    """A process and its live descendants (children of any of its threads), from /proc."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for children in Path(f"/proc/{current}/task").glob("*/children"):
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                todo += [int(c) for c in children.read_text().split()]
    return found


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its live descendants, from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for p in process_tree(pid):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def status_kb(pid: int, field: str) -> int:
    """A memory figure of /proc/PID/status (VmRSS, VmHWM, ...); 0 once the process is gone."""
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    return 0


def rss_mb(pid: int) -> float:
    """Resident memory (VmRSS) of a process and its live descendants, in MB."""
    return round(sum(status_kb(p, "VmRSS") for p in process_tree(pid)) / 1024, 1)


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
        )
        env.update(extra)  # a target's own settings win
        return env

    @functools.cached_property
    def admin(self) -> httpx.Client:
        """One client for the stand-in's admin endpoints: samplers poll them ten times a
        second, and a new client each time (a TLS context and a connection) costs a tenth
        of a core on a slow machine, beside the worker being measured."""
        return httpx.Client(base_url=self.standin_url)

    def stats(self) -> dict[str, Any]:
        return dict(self.admin.get("/_standin/stats").json())

    def reset(self) -> None:
        self.admin.post("/_standin/reset")


@contextlib.contextmanager
def services(
    latency_ms: float = LATENCY_MS, standin_args: Sequence[str] = (), pg_admin: str = PG_ADMIN
) -> Iterator[Services]:
    workdir = Path(tempfile.mkdtemp(prefix="rerank-bench-"))
    port_file = workdir / "standin.port"
    keys = ",".join(f"{n}={s}" for n, s in KEYS.items())
    standin = subprocess.Popen(
        [sys.executable, "-m", "worker.standin", "--port", "0", "--port-file", str(port_file),
         "--keys", keys, "--latency-ms", str(latency_ms), *standin_args],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    redis_port = free_port()
    redis = subprocess.Popen(
        [embedded.find_redis_server(), "--port", str(redis_port), "--bind", "127.0.0.1",
         "--save", "", "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    db_name = f"rerank_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_admin, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{db_name}"')
    base = pg_admin.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
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
        with found.admin:
            yield found
    finally:
        for process in (standin, redis):
            process.terminate()
            process.wait(timeout=10)
        with psycopg.connect(pg_admin, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')


class Sampler:
    """Calls `probe` every `every_s` in a thread while the `with` block runs."""

    def __init__(self, probe: Callable[[], float], every_s: float = 0.1) -> None:
        self._probe = probe
        self._every_s = every_s
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._every_s):
            self.samples.append(self._probe())

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def mean(self) -> float:
        return round(sum(self.samples) / len(self.samples), 1) if self.samples else 0.0


def write_request_lines(path: Path, count: int, documents: Callable[[int], list[Any]]) -> None:
    """A requests file of `count` lines; `documents(i)` gives line i's documents."""
    with path.open("w") as out:
        for i in range(count):
            request = {"custom_id": f"r{i}", "query": f"q {i}", "documents": documents(i)}
            out.write(json.dumps(request))
            out.write("\n")


def write_requests(path: Path, count: int, docs: int, seed: int = 1) -> None:
    rng = random.Random(seed)
    write_request_lines(
        path, count, lambda i: [f"doc {j} of {i}: {rng.random():.8f}" for j in range(docs)]
    )


IMAGES_PER_REQUEST = 10


def write_image_requests(path: Path, count: int, docs: int, image_kb: int) -> None:
    """Requests whose documents are base64 images of about `image_kb` KB each (random bytes,
    which compress no better than real pictures do)."""
    picture = base64.b64encode(random.Random(2).randbytes(image_kb * 768)).decode()
    write_request_lines(
        path,
        count,
        lambda i: [{"image": f"data:image/png;base64,{i}x{j}{picture}"} for j in range(docs)],
    )


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


DONE = ("completed", "cancelled", "failed")


def wait_until(
    predicate: Callable[[], Any], timeout_s: float, what: str, every_s: float = 0.1
) -> Any:
    """Poll until `predicate` returns something truthy; that value."""
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(every_s)
    return value


def wait_job(
    settings: Settings, job_id: str, timeout_s: float = 900, every_s: float = 0.1
) -> dict[str, Any]:
    """Poll the job's row in SQL from this process, then read its whole status once it
    ended. Not a CLI per poll (that would eat a core), nor the request counts that `wait`
    shows (6.5 ms of the measured database's time at each poll, for 8,000 requests)."""
    from worker.service.read import job_status

    maker = get_sessionmaker(settings.sqlalchemy_url())

    def ended() -> bool:
        with maker() as session:
            return session.scalar(select(Job.status).where(Job.id == job_id)) in DONE

    wait_until(ended, timeout_s, f"job {job_id} to end", every_s)
    return job_status(job_id, settings)


def database_settings(env: dict[str, str]) -> Settings:
    return Settings(database_url=env["RERANK_DATABASE_URL"])


def rate_figures(calls: int, elapsed_s: float, latency_ms: float = LATENCY_MS) -> dict[str, float]:
    """Calls per second, and their share of the keys' limit (slots / latency)."""
    limit = len(KEYS) * SLOTS_PER_KEY / (latency_ms / 1000)
    return {
        "calls_per_s": round(calls / elapsed_s, 1),
        "percent_of_limit": round(100 * calls / elapsed_s / limit, 1),
    }


def ms_per_call(cpu_seconds: float, calls: int) -> float:
    return round(1000 * cpu_seconds / calls, 3)


@dataclass
class Row:
    """One line of the table: a target's name and its figures (column key -> value)."""

    name: str
    figures: dict[str, Any]


def bench_throughput(requests: int, docs: int, worker_args: list[str]) -> list[Row]:
    """One `rerank-worker worker` at default settings; submit start to completed, beside
    the reference bare client making as many calls to the same stand-in just before.

    "First call after" is the part of that time before any upstream call: the start-up of
    `submit` (imports, parse, store, publish) and of the worker's first claim.
    The worker's resident memory (with any children) is read at the start and the end of
    the run and sampled in between: after warming up (mid-run) it should stay flat.
    """
    with services() as svc:
        reference = run_bare(svc, REFERENCE, requests, docs)
        env = svc.env()
        settings = database_settings(env)
        path = svc.workdir / "requests.jsonl"
        write_requests(path, requests, docs)
        with worker(env, *worker_args) as process:
            time.sleep(3)  # let the worker connect before the clock starts
            cpu_before = cpu_s(process.pid)
            standin_cpu_before = cpu_s(svc.standin.pid)
            rss_start = rss_mb(process.pid)
            submitted_at, started = utcnow(), time.monotonic()
            job_id = cli(env, "submit", str(path)).stdout.strip().splitlines()[-1]
            with (
                Sampler(lambda: svc.stats()["total"]["in_flight"]) as in_flight,
                Sampler(lambda: rss_mb(process.pid), every_s=0.5) as rss,
            ):
                status = wait_job(settings, job_id)
            elapsed_s = time.monotonic() - started
            cpu = cpu_s(process.pid) - cpu_before
            standin_cpu = cpu_s(svc.standin.pid) - standin_cpu_before
            rss_end = rss_mb(process.pid)
            first_call_s = first_call_after_ms(settings, job_id, submitted_at) / 1000
        calls = svc.stats()["total"]["ok"]
    rss_mid = rss.samples[len(rss.samples) // 2] if rss.samples else rss_start
    rss_max = max([rss_start, rss_end, *rss.samples])
    figures = {
        "items": f"{requests} requests",
        "succeeded": status["succeeded"],
        "elapsed_s": round(elapsed_s, 1),
        **rate_figures(calls, elapsed_s),
        "first_call_s": round(first_call_s, 2),
        "cpu_ms_per_call": ms_per_call(cpu, calls),
        "standin_cpu_ms_per_call": ms_per_call(standin_cpu, calls),
        "mean_calls_in_flight": in_flight.mean(),
        "worker_rss_mb": f"{rss_start:.0f} / {rss_mid:.0f} / {rss_end:.0f} / {rss_max:.0f}",
    }
    figures["percent_of_reference"] = round(
        100 * figures["calls_per_s"] / reference["calls_per_s"], 1
    )
    figures["reference_cpu_ms_per_call"] = reference["cpu_ms_per_call"]
    return [Row(REFERENCE, reference), Row("rerank-worker, 1 worker", figures)]


def bench_start(requests: int, docs: int, runs: int) -> list[Row]:
    """How soon a large job starts: `runs` submits of a fresh requests file (new documents
    each time, so no answer comes from the cache) to one idle worker, each job cancelled once
    its first upstream call is recorded. Submit time is the CLI's wall time."""
    submit_s: list[float] = []
    first_call_s: list[float] = []
    with services() as svc:
        env = svc.env()
        settings = database_settings(env)
        with worker(env):
            time.sleep(3)  # let the worker connect before the clock starts
            for run in range(runs):
                path = svc.workdir / f"start-{run}.jsonl"
                write_requests(path, requests, docs, seed=100 + run)
                submitted_at, started = utcnow(), time.monotonic()
                job_id = cli(env, "submit", str(path)).stdout.strip().splitlines()[-1]
                submit_s.append(time.monotonic() - started)
                started_at = wait_until(
                    lambda job=job_id: first_call_at(settings, job), 60, f"job {job_id}'s call"
                )
                first_call_s.append((started_at - submitted_at).total_seconds())
                cli(env, "cancel", job_id)
                wait_job(settings, job_id, timeout_s=120)

    def spread(values: list[float]) -> str:
        return f"{statistics.median(values):.2f} ({min(values):.2f} to {max(values):.2f})"

    figures = {
        "items": f"{requests} requests x {runs}",
        "submit_s": spread(submit_s),
        "first_call_s": spread(first_call_s),
    }
    return [Row("start of a large job, 1 worker", figures)]


@dataclass
class Measured:
    """One child process's wall time, peak resident memory and output."""

    elapsed_s: float
    peak_rss_mb: float
    stdout: str
    stderr: str


def run_measured(env: dict[str, str], workdir: Path, *args: str) -> Measured:
    """Run one CLI command in a fresh child and poll its peak RSS (VmHWM) until it exits.

    Not ru_maxrss: Linux carries the RSS of the process that forked into the child's
    ru_maxrss, so every child of a grown bench would report the bench's size.
    """
    out_path, err_path = workdir / "measured.out", workdir / "measured.err"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        started = time.monotonic()
        process = subprocess.Popen(
            [sys.executable, "-m", "worker", *args], env=env, stdout=out, stderr=err
        )
        peak_kb = 0
        while process.poll() is None:
            peak_kb = max(peak_kb, status_kb(process.pid, "VmHWM"))
            time.sleep(0.01)
        elapsed_s = time.monotonic() - started
    stdout, stderr = out_path.read_text(), err_path.read_text()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {process.returncode}: {stderr[-2000:]}")
    return Measured(elapsed_s, round(peak_kb / 1024, 1), stdout, stderr)


def write_corpus(path: Path, count: int, chunk: int = 10_000, edit_every: int = 0) -> None:
    """A corpus file: one document per line, most with an id, some plain strings.

    With `edit_every`, every so many documents read differently (a revised corpus)."""
    with path.open("w") as out:
        for start in range(0, count, chunk):
            out.write(
                "".join(
                    f'{{"id":"sku-{i}","text":"item {i}: leather boot, size {i % 47}, '
                    f'colour {i % 13}, lining {i % 7}{_edit(i, edit_every)}"}}\n'
                    if i % 4
                    else f'"item {i}: trail runner with a mesh upper, size {i % 47}'
                    f'{_edit(i, edit_every)}"\n'
                    for i in range(start, min(count, start + chunk))
                )
            )


def _edit(i: int, edit_every: int) -> str:
    return " (revised)" if edit_every and i % edit_every == 0 else ""


def document_rows(database_url: str, job_id: str) -> int:
    with psycopg.connect(database_url.replace("+psycopg", "")) as connection:
        row = connection.execute(
            "SELECT count(*) FROM document JOIN request ON request.id = document.request_id "
            "WHERE request.job_id = %s",
            (job_id,),
        ).fetchone()
    assert row is not None
    return int(row[0])


def _ingest_row(svc: Services, name: str, documents: int, path: Path, *submit_args: str) -> Row:
    run = run_measured(svc.env(), svc.workdir, "submit", str(path), *submit_args)
    job_id = run.stdout.strip().splitlines()[-1]
    stored = document_rows(svc.database_url, job_id)
    if stored != documents:
        raise RuntimeError(f"{name}: {stored} documents stored, not {documents}")
    figures = {
        "items": f"{documents} documents",
        "elapsed_s": round(run.elapsed_s, 1),
        "docs_per_s": round(documents / run.elapsed_s),
        "input_mb_per_s": round(path.stat().st_size / 1e6 / run.elapsed_s, 1),
        "peak_rss_mb": run.peak_rss_mb,
    }
    return Row(name, figures)


def bench_ingest(
    corpus_docs: int, requests: int, docs: int, image_requests: int, image_kb: int
) -> list[Row]:
    """`rerank-worker submit` of a corpus file (`--query`), of a requests file and of a
    requests file of images into PostgreSQL, each in a fresh process: wall time from start
    to exit, and its peak RSS. No worker runs; the job's messages wait in the bench's Redis."""
    with services() as svc:
        corpus = svc.workdir / "corpus.jsonl"
        write_corpus(corpus, corpus_docs)
        path = svc.workdir / "requests.jsonl"
        write_requests(path, requests, docs)
        images = svc.workdir / "images.jsonl"
        write_image_requests(images, image_requests, IMAGES_PER_REQUEST, image_kb)
        return [
            _ingest_row(
                svc, "ingest corpus (--query)", corpus_docs, corpus,
                "--query", "waterproof hiking boots", "--top-n", "100",
            ),
            _ingest_row(svc, f"ingest requests ({requests} x {docs})", requests * docs, path),
            _ingest_row(
                svc, f"ingest images ({image_requests} x {IMAGES_PER_REQUEST}, {image_kb} KB)",
                image_requests * IMAGES_PER_REQUEST, images,
            ),
        ]  # fmt: skip


@contextlib.contextmanager
def api_process(env: dict[str, str]) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`rerank-worker api` (one uvicorn process) on a free port, without any upstream key."""
    port = free_port()
    api_env = {k: v for k, v in env.items() if k != "RERANK_API_KEYS"}
    log = (Path(env["RERANK_DATA_DIR"]).parent / "api.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "worker", "api", "--port", str(port)], env=api_env, stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    base_url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        with contextlib.suppress(httpx.TransportError):
            return httpx.get(f"{base_url}/healthz", timeout=2).status_code == 200
        return False

    try:
        wait_until(healthy, 60, "the API to answer /healthz")
        yield process, base_url
    finally:
        process.terminate()
        process.wait(timeout=60)


def _upload_row(svc: Services, documents: int, path: Path, cli_docs_per_s: float) -> Row:
    """POST the corpus file to the API, streamed from disk, as a tenant would."""
    token = json.loads(cli(svc.env(), "tokens", "create", f"bench-{uuid.uuid4().hex[:6]}",
                           "--json").stdout)["token"]  # fmt: skip
    with api_process(svc.env()) as (process, base_url):
        idle_mb = round(status_kb(process.pid, "VmRSS") / 1024, 1)
        with path.open("rb") as body, httpx.Client(base_url=base_url, timeout=600) as client:
            started = time.monotonic()
            answer = client.post(
                "/v1/jobs",
                content=body,
                params={"query": "waterproof hiking boots", "top_n": 100},
                headers={"Authorization": f"Bearer {token}",
                         "Content-Type": "application/x-ndjson"},
            )  # fmt: skip
            elapsed_s = time.monotonic() - started
        peak_mb = round(status_kb(process.pid, "VmHWM") / 1024, 1)
    if answer.status_code != 201:
        raise RuntimeError(f"upload answered {answer.status_code}: {answer.text[:2000]}")
    stored = document_rows(svc.database_url, answer.json()["id"])
    if stored != documents:
        raise RuntimeError(f"upload: {stored} documents stored, not {documents}")
    docs_per_s = documents / elapsed_s
    figures = {
        "items": f"{documents} documents",
        "elapsed_s": round(elapsed_s, 1),
        "docs_per_s": round(docs_per_s),
        "input_mb_per_s": round(path.stat().st_size / 1e6 / elapsed_s, 1),
        "peak_rss_mb": f"{peak_mb} (idle {idle_mb})",
        "percent_of_cli": round(100 * docs_per_s / cli_docs_per_s, 1),
    }
    return Row("upload corpus over HTTP (POST /v1/jobs)", figures)


def bench_upload(corpus_docs: int) -> list[Row]:
    """A corpus file posted to `POST /v1/jobs` (one API process, PostgreSQL) against
    `rerank-worker submit --query` of the same file: documents/s of both and the API
    process's peak RSS. The CLI runs before and after the upload; its figure is the mean."""
    with services() as svc:
        corpus = svc.workdir / "corpus.jsonl"
        write_corpus(corpus, corpus_docs)
        args = ("--query", "waterproof hiking boots", "--top-n", "100")
        before = _ingest_row(svc, "submit corpus (CLI, before)", corpus_docs, corpus, *args)
        cli_docs_per_s = float(before.figures["docs_per_s"])
        upload = _upload_row(svc, corpus_docs, corpus, cli_docs_per_s)
        after = _ingest_row(svc, "submit corpus (CLI, after)", corpus_docs, corpus, *args)
        mean_cli = (cli_docs_per_s + float(after.figures["docs_per_s"])) / 2
        api_docs_per_s = float(upload.figures["docs_per_s"])
        upload.figures["percent_of_cli"] = round(100 * api_docs_per_s / mean_cli, 1)
        return [before, upload, after]


# Ten results per request, indexes spread over 100 documents, scores descending; it refers
# to the row's position so that PostgreSQL computes it for each row.
CORPUS_QUERY = "waterproof hiking boots"


def bench_cache(corpus_docs: int, edit_every: int) -> list[Row]:
    """The score cache: one corpus ranked three times by one worker (cold, unchanged, then
    with every `edit_every`-th document revised), each timed from submit to completed."""
    with services() as svc:
        env = svc.env()
        corpus, edited = svc.workdir / "corpus.jsonl", svc.workdir / "edited.jsonl"
        write_corpus(corpus, corpus_docs)
        write_corpus(edited, corpus_docs, edit_every=edit_every)
        runs = [
            ("cache: corpus, cold", corpus),
            ("cache: same corpus again", corpus),
            (f"cache: 1 in {edit_every} documents revised", edited),
        ]
        rows = []
        with worker(env):
            time.sleep(3)  # let the worker connect before the clock starts
            for name, path in runs:
                svc.reset()
                started = time.monotonic()
                submitted = cli(env, "submit", str(path), "--query", CORPUS_QUERY, "--top-n", "100")
                status = wait_job(database_settings(env), submitted.stdout.strip().splitlines()[-1])
                elapsed_s = time.monotonic() - started
                upstream = svc.stats()["total"]
                figures = {
                    "items": f"{corpus_docs} documents",
                    "succeeded": status["succeeded"],
                    "elapsed_s": round(elapsed_s, 1),
                    "upstream_calls": upstream["ok"],
                    "docs_sent": upstream["documents_scored"],
                    "cache_hit_rate": status["cache"]["hit_rate"],
                    "tokens_saved": status["cache"]["tokens_saved"],
                }
                rows.append(Row(name, figures))
        return rows


POLL_S = 0.01
# Gap between two interactive submissions, so each one meets a full pipeline.
GAP_S = 0.5
INTERACTIVE_DOCUMENTS = 10


def use_env(env: dict[str, str]) -> Settings:
    """Point this process at the bench's services, as a worker host would be."""
    for key in [k for k in os.environ if k.startswith("RERANK_")]:
        del os.environ[key]
    os.environ.update({k: v for k, v in env.items() if k.startswith("RERANK_")})
    get_settings.cache_clear()
    from worker.celery_app import app

    if app.conf.broker_url != env["RERANK_REDIS_URL"]:
        raise RuntimeError("the Celery app was created for another broker in this process")
    return get_settings()


def wait_saturated(svc: Services, timeout_s: float = 120) -> None:
    """Until the bulk job has made enough calls to have filled the worker's pipeline."""
    slots = len(KEYS) * SLOTS_PER_KEY
    wait_until(
        lambda: svc.stats()["total"]["ok"] >= 4 * slots,
        timeout_s,
        "the bulk job to fill the keys",
        every_s=0.05,
    )


def interactive_line(sample: int) -> bytes:
    """A fresh query each time, so no answer can come from a cache."""
    tag = uuid.uuid4().hex
    documents = [f"interactive doc {j} {tag}" for j in range(INTERACTIVE_DOCUMENTS)]
    request = {"custom_id": f"i{sample}", "query": f"interactive {tag}", "documents": documents}
    return json.dumps(request).encode() + b"\n"


def first_call_at(settings: Settings, job_id: str) -> dt.datetime | None:
    """When the job's first upstream call started; None before it has one."""
    from worker.service.scope import sessions

    with sessions(settings)() as session:
        return session.scalar(
            select(func.min(UpstreamCall.created_at)).where(UpstreamCall.job_id == job_id)
        )


def first_call_after_ms(settings: Settings, job_id: str, submitted_at: dt.datetime) -> float:
    """From submit to the start of the job's first upstream call (wall clocks, one host)."""
    started = first_call_at(settings, job_id)
    if started is None:
        raise RuntimeError(f"job {job_id} completed without an upstream call")
    return (started - submitted_at).total_seconds() * 1000


def time_interactive(settings: Settings, sample: int) -> tuple[float, float]:
    """Submit one one-request interactive job; (ms until completed, ms until its call)."""
    from worker.service.submit import JobOptions, submit_job

    submitted_at = utcnow()
    started = time.monotonic()
    job = submit_job(
        [interactive_line(sample)], source="bench-interactive",
        options=JobOptions(priority="interactive"), settings=settings,
    )  # fmt: skip
    status = wait_job(settings, job.job_id, timeout_s=60, every_s=POLL_S)
    elapsed_ms = (time.monotonic() - started) * 1000
    if status["status"] != "completed" or status["succeeded"] != 1:
        raise RuntimeError(f"interactive job {sample} ended {status}")
    return elapsed_ms, first_call_after_ms(settings, job.job_id, submitted_at)


def submit_bulk(settings: Settings, path: Path) -> str:
    from worker.service.submit import submit_job

    with path.open("rb") as lines:
        return submit_job(lines, source=str(path), settings=settings).job_id


def bench_interactive(bulk_requests: int, samples: int, docs: int) -> list[Row]:
    """Interactive submit-to-completed latency while one worker is saturated by bulk.

    Once the keys are full, one-request interactive jobs are submitted one at a time with
    `worker.service.submit.submit_job` in this process (no CLI start-up), each timed until
    `job_status` says `completed` (polled every 10 ms). Publishing from this process ties
    its Celery app to this target's broker: the target runs once per bench process.
    """
    latency_ms = LATENCY_MS
    from worker.service.read import job_status

    with services(latency_ms) as svc:
        env = svc.env()
        settings = use_env(env)
        path = svc.workdir / "bulk.jsonl"
        write_requests(path, bulk_requests, docs)
        with worker(env):
            bulk_id = submit_bulk(settings, path)
            wait_saturated(svc)
            ok_before, started = svc.stats()["total"]["ok"], time.monotonic()
            latencies, to_call = [], []
            for sample in range(samples):
                elapsed_ms, call_ms = time_interactive(settings, sample)
                latencies.append(elapsed_ms)
                to_call.append(call_ms)
                time.sleep(GAP_S)
            window_s = time.monotonic() - started
            bulk_calls = svc.stats()["total"]["ok"] - ok_before - samples
            bulk = job_status(bulk_id, settings)
    if bulk["pending"] == 0:
        raise RuntimeError("the bulk job ended before the last sample: raise --bulk-requests")
    figures = {
        "items": f"{samples} jobs beside {bulk_requests} bulk",
        "interactive_latency_ms": (
            f"{statistics.median(latencies):.0f} / {max(latencies):.0f} "
            f"(call after {statistics.median(to_call):.0f})"
        ),
        **rate_figures(bulk_calls, window_s, latency_ms),
    }
    return [Row("interactive under bulk load", figures)]


SYNC_DOCUMENTS = 10
SYNC_WARMUP = 10


@dataclass
class SyncSample:
    job_id: str
    sent_at: dt.datetime
    total_ms: float
    server_ms: dict[str, float]


def sync_body() -> dict[str, Any]:
    """A fresh query each time, so no answer can come from the score cache."""
    tag = uuid.uuid4().hex
    return {
        "query": f"sync {tag}",
        "documents": [f"sync doc {j} {tag}" for j in range(SYNC_DOCUMENTS)],
        "return_documents": False,
    }


def server_timing(header: str) -> dict[str, float]:
    timings = {}
    for part in header.split(","):
        name, _, duration = part.strip().partition(";dur=")
        timings[name] = float(duration)
    return timings


def sync_calls(client: httpx.Client, samples: int) -> list[SyncSample]:
    """Sequential POST /v1/rerank calls, each timed by the client from send to answer."""
    made = []
    for _ in range(samples):
        body = sync_body()
        sent_at, started = utcnow(), time.perf_counter()
        answer = client.post("/v1/rerank", json=body)
        total_ms = (time.perf_counter() - started) * 1000
        if answer.status_code != 200 or len(answer.json()["results"]) != SYNC_DOCUMENTS:
            raise RuntimeError(f"sync rerank answered {answer.status_code}: {answer.text[:300]}")
        timing = server_timing(answer.headers["server-timing"])
        made.append(SyncSample(answer.headers["rerank-job-id"], sent_at, total_ms, timing))
    return made


def sync_stages(settings: Settings, samples: list[SyncSample]) -> list[dict[str, float]]:
    """Each sample's time split at what SQL saw (wall clocks of one host): until its job row,
    to the worker's claim, to the start of its call, the call, to the recorded outcome, and
    from there to the answer (the end-of-job notice, the read, the HTTP answer)."""
    from worker.service.scope import sessions

    by_job: dict[str, tuple[Any, ...]] = {}
    with sessions(settings)() as session:
        rows = session.execute(
            select(
                Job.id,
                Job.created_at,
                Job.started_at,
                UpstreamCall.created_at,
                UpstreamCall.latency_ms,
                Request.finished_at,
            )
            .join(UpstreamCall, UpstreamCall.job_id == Job.id)
            .join(Request, Request.job_id == Job.id)
            .where(Job.id.in_([s.job_id for s in samples]))
        )
        by_job = {row[0]: tuple(row[1:]) for row in rows}

    def ms(start: dt.datetime, end: dt.datetime) -> float:
        return (end - start).total_seconds() * 1000

    stages = []
    for sample in samples:
        created, claimed, call_start, call_ms, recorded = by_job[sample.job_id]
        call_end = call_start + dt.timedelta(milliseconds=call_ms)
        stages.append(
            {
                "row": ms(sample.sent_at, created),
                "claim": ms(created, claimed),
                "to_call": ms(claimed, call_start),
                "call": call_ms,
                "record": ms(call_end, recorded),
                "answer": sample.total_ms - ms(sample.sent_at, recorded),
                "added": sample.total_ms - call_ms,
                **{f"server_{k}": v for k, v in sample.server_ms.items()},
            }
        )
    return stages


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def sync_figures(
    stages: list[dict[str, float]], samples: list[SyncSample], latency_ms: float, cpu_ms: str
) -> dict[str, Any]:
    added = [s["added"] for s in stages]
    totals = [s.total_ms for s in samples]

    def p50(name: str) -> str:
        return f"{statistics.median(s[name] for s in stages):.1f}"

    return {
        "sync_added_ms": f"{statistics.median(added):.1f} / {percentile(added, 0.99):.1f}",
        "sync_total_ms": (
            f"{statistics.median(totals):.1f} / {percentile(totals, 0.99):.1f} "
            f"(stand-in set to {latency_ms:.0f}, its calls took {p50('call')})"
        ),
        "sync_stages_ms": (
            f"to row {p50('row')}, to claim {p50('claim')}, to call {p50('to_call')}, "
            f"to record {p50('record')}, to answer {p50('answer')}; server: submit "
            f"{p50('server_submit')}, wait {p50('server_wait')}, read {p50('server_read')}"
        ),
        "sync_cpu_ms": cpu_ms,
    }


def bench_sync(samples: int, bulk_requests: int, docs: int) -> list[Row]:
    """Added latency of POST /v1/rerank over the upstream's own, idle and beside bulk.

    One `rerank-worker worker` at default settings and one `rerank-worker api` process; a
    client makes `samples` sequential calls of 10 documents (a fresh query each, so no
    cache hit). Added latency is a call's time at the client minus its upstream call's own
    latency as the worker measured it (SQL's `upstream_call.latency_ms`). Then a bulk job
    of `bulk_requests` keeps every key slot busy, and the same calls are timed again.
    """
    latency_ms = LATENCY_MS
    rows = []
    with services(latency_ms) as svc:
        env = svc.env()
        settings = database_settings(env)
        token = json.loads(cli(env, "tokens", "create", "bench", "--json").stdout)["token"]
        path = svc.workdir / "bulk.jsonl"
        write_requests(path, bulk_requests, docs)
        with (
            worker(env) as worker_process,
            api_process(env) as (api, base_url),
            httpx.Client(
                base_url=base_url, headers={"Authorization": f"Bearer {token}"}, timeout=120
            ) as client,
        ):

            def cpu() -> tuple[float, float]:
                return cpu_s(api.pid), cpu_s(worker_process.pid)

            def cpu_per_call(before: tuple[float, float]) -> str:
                api_s, worker_s = (after - b for after, b in zip(cpu(), before, strict=True))
                return f"API {1000 * api_s / samples:.1f}, worker {1000 * worker_s / samples:.1f}"

            sync_calls(client, SYNC_WARMUP)
            cpu_before = cpu()
            idle = sync_calls(client, samples)
            cpu_ms = cpu_per_call(cpu_before)
            figures = sync_figures(sync_stages(settings, idle), idle, latency_ms, cpu_ms)
            rows.append(Row("sync rerank, workers idle", {"items": f"{samples} calls", **figures}))

            bulk_id = cli(env, "submit", str(path)).stdout.strip().splitlines()[-1]
            wait_saturated(svc)
            ok_before, started = svc.stats()["total"]["ok"], time.monotonic()
            loaded = sync_calls(client, samples)
            window_s = time.monotonic() - started
            bulk_calls = svc.stats()["total"]["ok"] - ok_before - samples
            from worker.service.read import job_progress

            if job_progress(bulk_id, settings)["pending"] == 0:
                raise RuntimeError(
                    "the bulk job ended before the last sample: raise --bulk-requests"
                )
            figures = sync_figures(sync_stages(settings, loaded), loaded, latency_ms, "")
            figures.update(rate_figures(bulk_calls, window_s, latency_ms))
            rows.append(
                Row(
                    "sync rerank beside a bulk job",
                    {"items": f"{samples} calls beside {bulk_requests} bulk", **figures},
                )
            )
    return rows


FAKE_RESULTS_SQL = """
    SELECT '[' || string_agg(
        '{"index":' || mod(i * 7 + k * 13, 100) || ',"relevance_score":'
            || round((0.99 - k * 0.05 - random() * 0.04)::numeric, 6) || '}',
        ',' ORDER BY k) || ']'
    FROM generate_series(0, 9) AS k
"""


def make_finished_job(database_url: str, size: int) -> str:
    """A completed job of `size` succeeded requests, written straight into SQL as a worker
    would have left it (ten results each), without submitting or calling the API."""
    job_id = uuid.uuid4().hex
    with psycopg.connect(database_url.replace("+psycopg", "")) as connection:
        connection.execute(
            "INSERT INTO job (id, status, priority, source, total_requests, created_at, "
            "finished_at) VALUES (%s, 'completed', 'bulk', 'bench', %s, now(), now())",
            (job_id, size),
        )
        connection.execute(
            "INSERT INTO request (job_id, position, custom_id, query, model, return_documents, "
            "document_count, status, deliveries, finished_at, total_tokens, results_json) "
            "SELECT %s, i, 'r-' || i, 'query ' || i, 'jina-reranker-m0', false, 100, "
            f"'succeeded', 1, now(), 1000 + mod(i, 500), ({FAKE_RESULTS_SQL}) "
            "FROM generate_series(0, %s - 1) AS i",
            (job_id, size),
        )
    return job_id


def _export(svc: Services, size: int) -> Measured:
    job_id = make_finished_job(svc.database_url, size)
    output = svc.workdir / f"results-{size}.jsonl"
    run = run_measured(svc.env(), svc.workdir, "results", job_id, "-o", str(output))
    with output.open("rb") as lines:
        written = sum(1 for _ in lines)
    if written != size:
        raise RuntimeError(f"export: {written} lines written, not {size}")
    return run


def bench_export(sizes: list[int]) -> list[Row]:
    """`rerank-worker results JOB -o FILE` over a job of each size, in a fresh process.

    The jobs' finished requests are written directly in SQL (see make_finished_job):
    running them through the stand-in would take many minutes and is not what this
    measures. An empty job first gives the command's fixed cost (start-up, imports,
    schema check; the fastest of three runs, as it is short and the machine may be busy),
    so the streaming rate can be shown without it too. Peak RSS should not grow with the
    size: results stream.
    """
    with services() as svc:
        empty = min((_export(svc, 0) for _ in range(3)), key=lambda run: run.elapsed_s)
        rows = [Row("export results -o FILE", _export_figures(0, empty, empty))]
        for size in sizes:
            rows.append(
                Row("export results -o FILE", _export_figures(size, _export(svc, size), empty))
            )
    return rows


def _export_figures(size: int, run: Measured, empty: Measured) -> dict[str, Any]:
    figures: dict[str, Any] = {
        "items": f"{size} lines",
        "elapsed_s": round(run.elapsed_s, 1),
        "peak_rss_mb": run.peak_rss_mb,
    }
    if size:
        figures["lines_per_s"] = round(size / run.elapsed_s)
        streaming_s = max(run.elapsed_s - empty.elapsed_s, 0.001)  # noise on tiny sizes
        figures["stream_lines_per_s"] = round(size / streaming_s)
    return figures


def _rerank_body(i: int, docs: int) -> dict[str, Any]:
    return {
        "model": "jina-reranker-m0",
        "query": f"q {i}",
        "documents": [f"doc {j} of {i}" for j in range(docs)],
        "return_documents": False,
    }


async def _bare_gathered(base_url: str, calls: int, docs: int) -> None:
    """Every call at once over one shared pool, a semaphore per key."""
    limits = {name: asyncio.Semaphore(SLOTS_PER_KEY) for name in KEYS}
    names = list(KEYS)
    async with httpx.AsyncClient(
        base_url=base_url, limits=httpx.Limits(max_connections=64, max_keepalive_connections=64)
    ) as client:

        async def one(i: int) -> None:
            name = names[i % len(names)]
            async with limits[name]:
                response = await client.post(
                    "/jina/v1/rerank",
                    json=_rerank_body(i, docs),
                    headers={"authorization": f"Bearer {KEYS[name]}"},
                )
                response.raise_for_status()

        await asyncio.gather(*(one(i) for i in range(calls)))


async def _bare_per_slot(base_url: str, calls: int, docs: int) -> None:
    """One pooled client per key (connections = its slots) and one sender per slot, all
    taking the next call from one shared queue: no task per call, no semaphore, and a
    slot is never idle while calls are left."""
    todo: asyncio.Queue[int] = asyncio.Queue()
    for i in range(calls):
        todo.put_nowait(i)
    pool = httpx.Limits(max_connections=SLOTS_PER_KEY, max_keepalive_connections=SLOTS_PER_KEY)
    clients = {
        name: httpx.AsyncClient(
            base_url=base_url, limits=pool, headers={"authorization": f"Bearer {secret}"}
        )
        for name, secret in KEYS.items()
    }

    async def sender(client: httpx.AsyncClient) -> None:
        while True:
            try:
                i = todo.get_nowait()
            except asyncio.QueueEmpty:
                return
            response = await client.post("/jina/v1/rerank", json=_rerank_body(i, docs))
            response.raise_for_status()

    try:
        await asyncio.gather(
            *(sender(client) for client in clients.values() for _ in range(SLOTS_PER_KEY))
        )
    finally:
        for client in clients.values():
            await client.aclose()


BARE_CLIENTS = {
    "bare client: all calls gathered, one pool": _bare_gathered,
    REFERENCE: _bare_per_slot,
}


def run_bare(svc: Services, name: str, calls: int, docs: int) -> dict[str, Any]:
    """Run one bare client in this process against the stand-in; its figures."""
    svc.reset()
    usage_before = resource.getrusage(resource.RUSAGE_SELF)
    standin_cpu_before = cpu_s(svc.standin.pid)
    started = time.monotonic()
    asyncio.run(BARE_CLIENTS[name](svc.standin_url, calls, docs))
    elapsed_s = time.monotonic() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    standin_cpu = cpu_s(svc.standin.pid) - standin_cpu_before
    svc.reset()
    cpu = usage.ru_utime + usage.ru_stime - usage_before.ru_utime - usage_before.ru_stime
    return {
        "items": f"{calls} calls",
        "elapsed_s": round(elapsed_s, 1),
        **rate_figures(calls, elapsed_s),
        "cpu_ms_per_call": ms_per_call(cpu, calls),
        "standin_cpu_ms_per_call": ms_per_call(standin_cpu, calls),
    }


def bench_bare(calls: int, docs: int) -> list[Row]:
    """The floor: asyncio + httpx alone, no queue, no database; both ways of writing it."""
    with services() as svc:
        return [Row(name, run_bare(svc, name, calls, docs)) for name in BARE_CLIENTS]


LIMITED_KEY = "k1"


def call_span_s(settings: Settings, job_id: str) -> float:
    """From the start of the job's first upstream call to the end of its last one."""
    from worker.service.scope import sessions

    with sessions(settings)() as session:
        rows = session.execute(
            select(UpstreamCall.created_at, UpstreamCall.latency_ms).where(
                UpstreamCall.job_id == job_id
            )
        ).all()
    first = min(created for created, _ in rows)
    last = max(created + dt.timedelta(milliseconds=latency) for created, latency in rows)
    return (last - first).total_seconds()


def limited_job(
    name: str,
    requests: int,
    docs: int,
    window_s: float,
    limits: dict[str, int],
    standin_args: Sequence[str],
) -> Row:
    """One job on one key with `limits`, against a stand-in that enforces them itself."""
    key = {"name": LIMITED_KEY, "secret": KEYS[LIMITED_KEY], "concurrency": SLOTS_PER_KEY}
    with services(standin_args=["--window-s", str(window_s), *standin_args]) as svc:
        env = svc.env(
            RERANK_API_KEYS=json.dumps([{**key, **limits}]), RERANK_RATE_WINDOW_S=str(window_s)
        )
        settings = database_settings(env)
        path = svc.workdir / "requests.jsonl"
        write_requests(path, requests, docs)
        with worker(env):
            time.sleep(3)  # let the worker connect before the clock starts
            started = time.monotonic()
            job_id = cli(env, "submit", str(path)).stdout.strip().splitlines()[-1]
            status = wait_job(settings, job_id)
            elapsed_s = time.monotonic() - started
            span_s = call_span_s(settings, job_id)
        stats = svc.stats()["total"]
    refused = stats["status_counts"].get("429", 0)
    figures = {
        "items": f"{requests} requests",
        "succeeded": status["succeeded"],
        "elapsed_s": round(elapsed_s, 1),
        "calls_span_s": round(span_s, 1),
        "limits": ", ".join(f"{k} {v}" for k, v in limits.items()) + f" per {window_s:g} s",
        "refused_rpm": stats["refused_rpm"],
        "refused_tpm": stats["refused_tpm"],
        "per_1000_calls_429": round(1000 * refused / max(stats["ok"], 1), 1),
    }
    return Row(name, figures)


def bench_limits(rpm: int, calls: int, window_s: float, docs: int) -> list[Row]:
    """Jobs bound by a key's rpm or tpm, against a stand-in enforcing the same limits.

    First 2R calls on a key of rpm R with the real 60 s window: at the limit that is one
    window plus the calls' own time. Then `calls` calls bound by rpm (the stand-in sends no
    Retry-After) and by tpm (the stand-in bills twice its own count, which is not the
    worker's estimate either: the ratio is learnt during the run), over a shortened window,
    counting the 429s per 1,000 calls answered.
    """
    rows = [
        limited_job(
            f"2R calls, rpm R={rpm}", 2 * rpm, docs, constants.RATE_WINDOW_S, {"rpm": rpm},
            ["--rpm", f"{LIMITED_KEY}={rpm}"],
        )
    ]  # fmt: skip
    windows = 5
    per_window = calls // windows
    rows.append(
        limited_job(
            "rpm-bound job", calls, docs, window_s, {"rpm": per_window},
            ["--rpm", f"{LIMITED_KEY}={per_window}", "--no-rate-limit-retry-after"],
        )
    )  # fmt: skip
    billed = billed_tokens(calls, docs, factor=2)
    tpm = billed // windows
    rows.append(
        limited_job(
            "tpm-bound job (billed 2x)", calls, docs, window_s, {"tpm": tpm},
            ["--tpm", f"{LIMITED_KEY}={tpm}", "--token-factor", "2"],
        )
    )  # fmt: skip
    return rows


def billed_tokens(requests: int, docs: int, factor: float) -> int:
    """What the stand-in bills for the file `write_requests` writes (by its own count)."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "requests.jsonl"
        write_requests(path, requests, docs)
        total = 0
        for line in path.read_text().splitlines():
            request = json.loads(line)
            total += rank(request["query"], request["documents"])[1]
    return round(total * factor)


# What an upstream call costs the shared servers: counted on a PostgreSQL cluster of the
# bench's own (pg_stat_statements must be preloaded, which the machine's cluster is not).
PG_STATEMENT_SETTINGS = {
    "shared_preload_libraries": "pg_stat_statements",
    "pg_stat_statements.track": "all",
}


def postgres_cpu_s(postmaster: int) -> float:
    """CPU of a cluster: its live processes, and the backends it has reaped (cutime)."""
    ticks = os.sysconf("SC_CLK_TCK")
    fields = Path(f"/proc/{postmaster}/stat").read_text().rsplit(")", 1)[1].split()
    return cpu_s(postmaster) + (int(fields[13]) + int(fields[14])) / ticks


@dataclass(frozen=True)
class ServerCounts:
    redis_calls: dict[str, int]
    redis_cpu_s: float
    postgres_cpu_s: float


def server_counts(redis_client: Any, postmaster: int) -> ServerCounts:
    stats = redis_client.info("commandstats")
    cpu = redis_client.info("cpu")
    return ServerCounts(
        redis_calls={name.removeprefix("cmdstat_"): v["calls"] for name, v in stats.items()},
        redis_cpu_s=float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
        postgres_cpu_s=postgres_cpu_s(postmaster),
    )


def per_call_text(counts: dict[str, float], calls: int) -> str:
    """'evalsha 2.01, get 0.5' for the counts of at least 0.01 per call, largest first."""
    shares = sorted(((n / calls, name) for name, n in counts.items()), reverse=True)
    return ", ".join(f"{name} {share:.2f}" for share, name in shares if share >= 0.01)


def statement_kind(query: str) -> str:
    """A statement's verb (and a COPY's table); the foreign-key checks that PostgreSQL runs
    for each row written are told apart."""
    if "FOR KEY SHARE OF x" in query:
        return "foreign-key check"
    words = query.split(None, 2)
    if words[:1] == ["COPY"]:
        return f"COPY {words[1]}"
    return words[0].upper() if words else "?"


def bench_capacity(requests: int, docs: int) -> list[Row]:
    """One bulk job (submit to completed, default worker, Redis as broker) and what each of
    its upstream calls cost Redis and PostgreSQL: commands (those its scripts run included)
    and statements (those PostgreSQL runs for them, foreign-key checks, included), transactions,
    and the servers' CPU. A ceiling is the calls/s at which that server would use a whole
    core for this work alone (Redis runs commands on one core; PostgreSQL on as many as it
    is given)."""
    import redis

    with started_cluster(free_port(), settings=PG_STATEMENT_SETTINGS) as cluster:
        pg_admin = f"postgresql://postgres@127.0.0.1:{cluster.port}/postgres"
        with services(pg_admin=pg_admin) as svc:
            env = svc.env()
            settings = database_settings(env)
            database = psycopg.connect(
                svc.database_url.replace("postgresql+psycopg://", "postgresql://"),
                autocommit=True,
            )
            database.execute("CREATE EXTENSION pg_stat_statements")
            redis_client = redis.Redis.from_url(svc.redis_url)
            path = svc.workdir / "requests.jsonl"
            write_requests(path, requests, docs)
            with worker(env) as process:
                time.sleep(3)  # let the worker connect before the counts start
                redis_client.config_resetstat()
                database.execute("SELECT pg_stat_statements_reset()")
                before = server_counts(redis_client, cluster.postmaster_pid)
                job_id = cli(env, "submit", str(path)).stdout.strip().splitlines()[-1]
                status = wait_job(settings, job_id)
                after = server_counts(redis_client, cluster.postmaster_pid)
                statements: dict[str, float] = {}
                transactions = 0
                for query, count in database.execute(
                    "SELECT query, calls FROM pg_stat_statements "
                    "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
                ):
                    kind = statement_kind(query)
                    if kind == "BEGIN":
                        transactions += count
                    elif kind not in {"COMMIT", "ROLLBACK"}:
                        statements[kind] = statements.get(kind, 0) + count
                assert process.poll() is None, "the worker exited during the run"
            database.close()
            calls = svc.stats()["total"]["ok"]
    redis_calls = {
        name: n - before.redis_calls.get(name, 0) for name, n in after.redis_calls.items()
    }
    redis_us = 1e6 * (after.redis_cpu_s - before.redis_cpu_s) / calls
    postgres_us = 1e6 * (after.postgres_cpu_s - before.postgres_cpu_s) / calls
    common = {"items": f"{requests} requests, {calls} calls", "succeeded": status["succeeded"]}
    return [
        Row(
            "Redis (limits, and Celery's broker here)",
            {
                **common,
                "ops_per_call": round(sum(redis_calls.values()) / calls, 2),
                "ops_detail": per_call_text(redis_calls, calls),
                "server_cpu_us_per_call": round(redis_us, 1),
                "ceiling_calls_per_s": round(1e6 / redis_us),
            },
        ),
        Row(
            "PostgreSQL",
            {
                **common,
                "ops_per_call": round(sum(statements.values()) / calls, 2),
                "ops_detail": per_call_text(statements, calls),
                "transactions_per_call": round(transactions / calls, 2),
                "server_cpu_us_per_call": round(postgres_us, 1),
                "ceiling_calls_per_s": round(1e6 / postgres_us),
            },
        ),
    ]


# Column key -> header, in table order. A figure whose key is not here gets a column of its
# own at the end, headed by the key.
COLUMNS = {
    "items": "size",
    "elapsed_s": "wall s",
    "calls_per_s": "calls/s",
    "percent_of_limit": "% of limit",
    "percent_of_reference": "% of reference calls/s",
    "first_call_s": "first call after s",
    "submit_s": "submit s",
    "cpu_ms_per_call": "CPU ms/call",
    "reference_cpu_ms_per_call": "reference CPU ms/call",
    "standin_cpu_ms_per_call": "stand-in CPU ms/call",
    "docs_per_s": "ingest docs/s",
    "input_mb_per_s": "input MB/s",
    "peak_rss_mb": "peak RSS MB",
    "lines_per_s": "export lines/s",
    "stream_lines_per_s": "export lines/s after start-up",
    "upstream_calls": "upstream calls",
    "docs_sent": "documents sent",
    "cache_hit_rate": "cache hit rate",
    "tokens_saved": "saved tokens",
    "interactive_latency_ms": "interactive ms median / max (to its call)",
    "worker_rss_mb": "worker RSS MB start/mid/end/max",
    "mean_calls_in_flight": "calls in flight",
    "succeeded": "succeeded",
    "sync_added_ms": "sync added ms p50 / p99",
    "sync_total_ms": "sync ms p50 / p99 at the client",
    "sync_stages_ms": "sync ms p50 by stage",
    "sync_cpu_ms": "CPU ms per sync call",
    "percent_of_cli": "% of CLI docs/s",
    "calls_span_s": "first call to last s",
    "limits": "key limits",
    "per_1000_calls_429": "429s per 1,000 calls",
    "ops_per_call": "commands or statements per call",
    "ops_detail": "of which, per call",
    "transactions_per_call": "transactions per call",
    "server_cpu_us_per_call": "server CPU µs per call",
    "ceiling_calls_per_s": "calls/s at one core",
}

TARGETS: dict[str, Callable[[argparse.Namespace], list[Row]]] = {
    "bare": lambda a: bench_bare(a.requests, a.docs),
    "throughput": lambda a: bench_throughput(a.requests, a.docs, a.worker_args.split()),
    "ingest": lambda a: bench_ingest(
        a.corpus_docs, a.ingest_requests, a.ingest_docs, a.image_requests, a.image_kb
    ),
    "export": lambda a: bench_export([int(n) for n in a.export_lines.split(",")]),
    "cache": lambda a: bench_cache(a.cache_docs, a.cache_edit_every),
    "interactive": lambda a: bench_interactive(a.bulk_requests, a.samples, a.docs),
    "sync": lambda a: bench_sync(a.sync_samples, a.sync_bulk_requests, a.docs),
    "upload": lambda a: bench_upload(a.corpus_docs),
    "capacity": lambda a: bench_capacity(a.capacity_requests, a.docs),
    "start": lambda a: bench_start(a.requests, a.docs, a.start_runs),
    "limits": lambda a: bench_limits(a.limits_rpm, a.limits_calls, a.limits_window_s, a.docs),
}


def render(rows: list[Row]) -> Table:
    """One table: a row per target, a column per figure; blank where it does not apply."""
    keys = [k for k in COLUMNS if any(k in row.figures for row in rows)]
    keys += list(dict.fromkeys(k for row in rows for k in row.figures if k not in COLUMNS))
    table = Table("target", *(COLUMNS.get(k, k) for k in keys))
    for row in rows:
        table.add_row(row.name, *(str(row.figures.get(k, "")) for k in keys))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=list(TARGETS), action="append")
    parser.add_argument("--requests", type=int, default=16_000, help="throughput and bare")
    parser.add_argument("--docs", type=int, default=10, help="documents per request")
    parser.add_argument("--worker-args", default="", help="extra arguments for the worker")
    parser.add_argument(
        "--corpus-docs", type=int, default=1_000_000, help="ingest and upload: corpus"
    )
    parser.add_argument("--ingest-requests", type=int, default=10_000, help="ingest: requests")
    parser.add_argument("--ingest-docs", type=int, default=100, help="ingest: per request")
    parser.add_argument("--image-requests", type=int, default=1000, help="ingest: of images")
    parser.add_argument("--image-kb", type=int, default=50, help="ingest: size of an image")
    parser.add_argument("--export-lines", default="100000,1000000", help="export: job sizes")
    parser.add_argument("--bulk-requests", type=int, default=6000, help="interactive: bulk")
    parser.add_argument("--samples", type=int, default=10, help="interactive: jobs timed")
    parser.add_argument("--sync-samples", type=int, default=200, help="sync: calls timed")
    parser.add_argument(
        "--sync-bulk-requests", type=int, default=16_000, help="sync: bulk job beside the calls"
    )
    parser.add_argument("--cache-docs", type=int, default=100_000, help="cache: corpus size")
    parser.add_argument(
        "--cache-edit-every", type=int, default=100, help="cache: revise 1 in N documents"
    )
    parser.add_argument(
        "--capacity-requests", type=int, default=8000, help="capacity: the job counted"
    )
    parser.add_argument("--start-runs", type=int, default=5, help="start: jobs submitted")
    parser.add_argument("--limits-rpm", type=int, default=60, help="limits: R (60 s window)")
    parser.add_argument("--limits-calls", type=int, default=1000, help="limits: bound jobs")
    parser.add_argument(
        "--limits-window-s", type=float, default=5, help="limits: window of the bound jobs"
    )
    args = parser.parse_args()
    rows = [row for name in args.only or list(TARGETS) for row in TARGETS[name](args)]
    table = render(rows)
    console = Console()
    natural = console.measure(table, options=console.options.update_width(1000)).maximum
    console.width = max(console.width, natural)
    console.print(table)


if __name__ == "__main__":
    main()
