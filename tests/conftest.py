"""Fixtures that own real services: Redis, PostgreSQL or SQLite, the stand-in API, workers,
the HTTP API.

PostgreSQL and Redis are the machine's own (started by .ci/run); each test gets a fresh
database and a flushed Redis database index of its own.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import amqp.exceptions
import httpx
import kombu
import psycopg
import pytest
import redis

from worker import tenants
from worker.db import migrate
from worker.settings import get_settings
from worker.standin import StandinConfig, ThreadedStandin, run_in_thread

PG_ADMIN_URL = os.environ.get("RERANK_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_BASE = os.environ.get("RERANK_TEST_REDIS", "redis://127.0.0.1:6379")
RABBITMQ_BASE = os.environ.get("RERANK_TEST_RABBITMQ", "amqp://guest:guest@127.0.0.1:5672")
# One database index per test session (1-15), so two suites on one machine do not meet.
REDIS_DB = int(os.environ.get("RERANK_TEST_REDIS_DB", str(1 + os.getpid() % 15)))
SECRETS = {"alpha": "sk-test-alpha-0123456789abcdef", "beta": "sk-test-beta-fedcba9876543210"}
# How long after a 429 a call may still reach the stand-in without counting as inside the
# pause: the time a client needs to learn of it (the answer's way back, then Redis). On a
# loaded 2-core machine both the worker's event loop and the in-process stand-in lag.
PAUSE_GRACE_MS = 250
_counter = itertools.count()


def wait_for(
    predicate: Callable[[], object], timeout_s: float, what: str, every_s: float = 0.05
) -> object:
    """Poll until `predicate` returns something truthy, or fail naming `what`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(every_s)


@pytest.fixture
def redis_url() -> Iterator[str]:
    url = f"{REDIS_BASE}/{REDIS_DB}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


def rabbitmqctl(*args: str) -> subprocess.CompletedProcess[str]:
    """The machine's rabbitmqctl (as root); raises with its output when it fails."""
    done = subprocess.run(
        ["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60, check=False
    )
    if done.returncode != 0:
        raise AssertionError(f"rabbitmqctl {' '.join(args)} failed: {done.stdout}{done.stderr}")
    return done


def _rabbitmq_missing() -> str | None:
    """Why the RabbitMQ tests cannot run here, or None when they can."""
    if shutil.which("rabbitmqctl") is None:
        return "rabbitmqctl not found (scripts/services.sh installs rabbitmq-server)"
    if os.geteuid() != 0:
        return "rabbitmqctl needs root to make the test's own vhost"
    try:
        with kombu.Connection(RABBITMQ_BASE + "/", connect_timeout=3) as connection:
            connection.connect()
    except OSError as exc:
        return f"RabbitMQ does not answer at {RABBITMQ_BASE}: {exc}"
    return None


@dataclass
class Broker:
    """Celery's broker for one test: the test's Redis (url None: the default), or a
    RabbitMQ vhost of the test's own, made here and deleted at teardown."""

    kind: str
    url: str | None = None
    vhost: str | None = None

    def close_connections(self) -> None:
        """Cut every client connection to this test's vhost, and only those (the server and
        other vhosts' clients carry on)."""
        assert self.vhost is not None
        done = rabbitmqctl("close_all_connections", "-p", self.vhost, "cut by the test")
        assert "Closed 0 " not in done.stdout, done.stdout

    def purge(self, queue: str) -> None:
        assert self.vhost is not None
        rabbitmqctl("purge_queue", "-p", self.vhost, queue)

    def queued(self, queue: str) -> int:
        """Messages ready in the queue, as a passive declare counts them (rabbitmqctl's
        list_queues lags by seconds); 0 for a queue not declared yet."""
        assert self.url is not None
        with kombu.Connection(self.url, connect_timeout=5) as connection:
            try:
                _, count, _ = connection.channel().queue_declare(queue=queue, passive=True)
            except amqp.exceptions.NotFound:
                return 0
            return int(count)


BOTH_BROKERS = pytest.mark.parametrize("broker", ["redis", "amqp"], indirect=True)


@pytest.fixture
def broker(request: pytest.FixtureRequest) -> Iterator[Broker]:
    """Redis unless a test is parametrized over BOTH_BROKERS (or "amqp") indirectly."""
    kind = getattr(request, "param", "redis")
    if kind == "redis":
        yield Broker("redis")
        return
    missing = _rabbitmq_missing()
    if missing:
        pytest.skip(missing)
    vhost = f"rerank_test_{os.getpid()}_{next(_counter)}"
    rabbitmqctl("add_vhost", vhost)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield Broker("amqp", url=f"{RABBITMQ_BASE}/{vhost}", vhost=vhost)
    finally:
        rabbitmqctl("delete_vhost", vhost)


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def _postgres_database() -> Iterator[str]:
    name = f"rerank_test_{os.getpid()}_{next(_counter)}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    url = f"{base}/{name}"
    try:
        migrate.upgrade(url)
        yield url
    finally:
        from worker.db.session import get_engine

        get_engine(url).dispose()
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _sqlite_database(directory: Path) -> str:
    url = f"sqlite:///{directory / 'rerank.db'}"
    migrate.upgrade(url)
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each test that uses it runs on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        yield _sqlite_database(tmp_path)
    else:
        yield from _postgres_database()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A migrated SQLite database of the test's own."""
    return _sqlite_database(tmp_path)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    yield from _postgres_database()


@pytest.fixture
def standin() -> Iterator[ThreadedStandin]:
    with run_in_thread(StandinConfig(keys=dict(SECRETS), latency_ms=5, seed=7)) as server:
        yield server


def api_keys(**limits: int) -> str:
    return ",".join(f"{name}={SECRETS[name]}@{n}" for name, n in limits.items())


@dataclass
class Env:
    """The environment every process of one test shares (CLI, workers, in-process calls)."""

    values: dict[str, str]
    tmp_path: Path
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    def apply(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for key in [k for k in os.environ if k.startswith("RERANK_")]:
            monkeypatch.delenv(key)
        for key, value in self.values.items():
            monkeypatch.setenv(key, value)
        get_settings.cache_clear()

    def cli(
        self, *args: str, input: bytes | None = None, timeout_s: float = 120
    ) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RERANK_")}
        env.update(self.values)
        return subprocess.run(
            [sys.executable, "-m", "worker", *args],
            env=env,
            input=input.decode() if input is not None else None,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            cwd=self.tmp_path,
        )

    def start_worker(
        self,
        concurrency: int = 6,
        name: str | None = None,
        processes: int = 1,
        via: tuple[str, ...] = (),
        extra_args: Sequence[str] = (),
    ) -> subprocess.Popen[bytes]:
        """A real `rerank-worker worker` in its own process group; returns once it (each of
        its processes) is ready. `via` prefixes the command (`ip netns exec HOST`)."""
        name = name or f"w{len(self.workers)}"
        log_path = self.tmp_path / f"worker-{name}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("RERANK_")}
        env.update(self.values)
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [*via, sys.executable, "-m", "worker", "worker", "--concurrency", str(concurrency),
                 "--hostname", f"{name}@%h", "--loglevel", "INFO", "--processes", str(processes),
                 *extra_args],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.tmp_path,
                start_new_session=True,
            )  # fmt: skip
        self.workers.append(process)
        self.logs.append(log_path)
        wait_for(
            lambda: (
                log_path.read_bytes().count(b" ready.") >= processes or process.poll() is not None
            ),
            60,
            f"worker {name} to be ready",
        )
        assert process.poll() is None, log_path.read_text()
        return process

    def kill_worker(self, process: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        """Signal the worker's whole process group and wait for it to end."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        process.wait(timeout=30)

    def stop_workers(self) -> None:
        """A warm shutdown for each, then SIGKILL for any still alive: none outlives its test."""
        for process in self.workers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.workers:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)

    def all_logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.logs if p.exists())


@pytest.fixture
def make_env(
    tmp_path: Path,
    redis_url: str,
    broker: Broker,
    standin: ThreadedStandin,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Callable[..., Env]]:
    """Build the shared environment for a database (and the test's broker); workers are
    stopped at teardown."""
    made: list[Env] = []

    def build(database_url: str, keys: str | None = None, **extra: str) -> Env:
        values = {
            "RERANK_DATABASE_URL": database_url,
            "RERANK_REDIS_URL": redis_url,
            "RERANK_API_BASE": standin.base_url,
            "RERANK_API_KEYS": keys or api_keys(alpha=3, beta=2),
            "RERANK_DATA_DIR": str(tmp_path / "data"),
            "RERANK_BACKOFF_BASE_S": "0.02",
            "RERANK_BACKOFF_CAP_S": "0.5",
            "RERANK_CALL_TIMEOUT_S": "10",
            "RERANK_SWEEP_INTERVAL_S": "1",
            **({"RERANK_BROKER_URL": broker.url} if broker.url else {}),
            **extra,
        }
        env = Env(values=values, tmp_path=tmp_path)
        env.apply(monkeypatch)
        made.append(env)
        return env

    yield build
    for env in made:
        env.stop_workers()
    get_settings.cache_clear()


# The HTTP API: a real `rerank-worker api` process on a free port (tests/api/ and others).


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ApiServer:
    """A running API process; `tokens` maps tenant NAME -> token for those made here."""

    base_url: str
    env: Env
    process: subprocess.Popen[bytes]
    log_path: Path
    tokens: dict[str, str] = field(default_factory=dict)
    webhook_secrets: dict[str, str] = field(default_factory=dict)

    def create_token(self, name: str, *, admin: bool = False) -> str:
        made = tenants.create_tenant(name, get_settings(), is_admin=admin)
        self.tokens[name] = made.token
        self.webhook_secrets[name] = made.webhook_secret
        return made.token

    def client(self, tenant: str | None = None, **kwargs: object) -> httpx.Client:
        """An httpx client on the API, with the token of `tenant` (made here) if given."""
        headers = {"Authorization": f"Bearer {self.tokens[tenant]}"} if tenant else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=60, **kwargs)  # type: ignore[arg-type]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def start_api(tmp_path: Path) -> Iterator[Callable[..., ApiServer]]:
    """Start `rerank-worker api` processes on an Env; each is stopped at teardown."""
    started: list[ApiServer] = []

    def start(env: Env, *, workers: int = 1, drop: tuple[str, ...] = ()) -> ApiServer:
        port = free_port()
        log_path = tmp_path / f"api-{port}.log"
        environ = {k: v for k, v in os.environ.items() if not k.startswith("RERANK_")}
        environ.update({k: v for k, v in env.values.items() if k not in drop})
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "worker", "api", "--host", "127.0.0.1",
                 "--port", str(port), "--workers", str(workers)],
                env=environ,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=env.tmp_path,
                start_new_session=True,
            )  # fmt: skip
        server = ApiServer(f"http://127.0.0.1:{port}", env, process, log_path)
        started.append(server)

        def healthy() -> bool:
            assert process.poll() is None, server.log()
            with contextlib.suppress(httpx.TransportError):
                return httpx.get(f"{server.base_url}/healthz", timeout=5).status_code == 200
            return False

        wait_for(healthy, 60, f"the API on port {port} to answer /healthz", every_s=0.1)
        return server

    yield start
    for server in started:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.process.pid, signal.SIGTERM)
        try:
            server.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait(timeout=30)


@pytest.fixture
def api_server(
    database_url: str, make_env: Callable[..., Env], start_api: Callable[..., ApiServer]
) -> ApiServer:
    """The API on the test's database (SQLite, then PostgreSQL), with tokens for an admin
    and for the tenants `acme` and `globex`. It holds no upstream key."""
    env = make_env(database_url)
    server = start_api(env, drop=("RERANK_API_KEYS",))
    server.create_token("admin", admin=True)
    server.create_token("acme")
    server.create_token("globex")
    return server


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """A webhook receiver: answers each POST with the next status of `answers` (then 204),
    and keeps what it was sent. `hold` (when set) keeps the first request unanswered
    until it is released."""

    url: str = ""
    answers: list[int] = field(default_factory=list)
    deliveries: list[Delivery] = field(default_factory=list)
    hold: threading.Event | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, delivery: Delivery) -> tuple[int, threading.Event | None]:
        with self.lock:
            self.deliveries.append(delivery)
            first = len(self.deliveries) == 1
            status = self.answers.pop(0) if self.answers else 204
        return status, self.hold if first else None

    def ids(self) -> list[str]:
        with self.lock:
            return [d.headers["webhook-id"] for d in self.deliveries]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            status, hold = found.take(
                Delivery({k.lower(): v for k, v in self.headers.items()}, body)
            )
            if hold is not None:
                hold.wait(60)
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    found.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/rerank"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield found
    if found.hold is not None:
        found.hold.set()
    server.shutdown()
    server.server_close()
