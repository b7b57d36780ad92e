"""Servers that a reliability test owns outright: a Redis and a PostgreSQL cluster of its own,
on free ports, that the test stops and starts again mid-job.

The machine's shared servers (tests/conftest.py) cannot be restarted under other tests; these
can. Both are always stopped, and their files removed, at teardown. `make_env` is wrapped so
that a worker stuck in its warm shutdown (waiting on a server a failed test left down) is
killed at teardown rather than left running.

A note on imports: the test modules here (and tests/jobs_support.py) say `from conftest import
Env, ...` meaning tests/conftest.py. pytest imports every conftest.py that is not in a package
under the one module name `conftest`, so once this file is loaded that name means this module.
Names this module does not define are therefore looked up in tests/conftest.py (PEP 562), so
those imports keep working unchanged.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import redis
from own_postgres import OwnPostgres, started_cluster

from worker import embedded
from worker.db import migrate

_ROOT_CONFTEST = Path(__file__).resolve().parent.parent / "conftest.py"
_root_module: ModuleType | None = None

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0


def pytest_configure(config: pytest.Config) -> None:
    """Find tests/conftest.py as pytest loaded it (same objects, not a second copy)."""
    global _root_module
    for plugin in config.pluginmanager.get_plugins():
        path = getattr(plugin, "__file__", None)
        if isinstance(plugin, ModuleType) and path and Path(path).resolve() == _ROOT_CONFTEST:
            _root_module = plugin


def __getattr__(name: str) -> Any:
    if name.startswith(("__", "pytest_")) or _root_module is None:
        raise AttributeError(name)
    return getattr(_root_module, name)


WARM_SHUTDOWN_S = 20.0


@pytest.fixture
def make_env(make_env: Any) -> Iterator[Any]:
    """tests/conftest.py's make_env, plus a teardown that can never leave a worker behind.

    Here workers outlive servers that were stopped on purpose; one that does not finish its
    warm shutdown in time is killed, instead of the root teardown failing on it and leaving
    it (and any worker after it) running, consuming other tests' messages.
    """
    made: list[Any] = []

    def build(*args: Any, **kwargs: Any) -> Any:
        env = make_env(*args, **kwargs)
        made.append(env)
        return env

    yield build
    for env in made:
        alive = [p for p in env.workers if p.poll() is None]
        for process in alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + WARM_SHUTDOWN_S
        for process in alive:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=STOP_TIMEOUT_S)


def free_port() -> int:
    """A port nobody listens on right now (the OS picks it; the socket is closed again)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _poll(predicate: Any, timeout_s: float, what: str, every_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(every_s)


# ------------------------------------------------------------------------------------- Redis


class OwnRedis:
    """A redis-server process on its own port and directory; stop() and start() it at will.

    `start(persist=True)` runs with an append-only file (fsync on every write, so nothing
    acknowledged is lost on stop) and loads what a previous persistent run wrote;
    `start(persist=False)` starts empty, as a Redis restarted without persistence does.
    RDB snapshots are always off (`--save ""`).
    """

    def __init__(self, directory: Path, port: int, bind: str = "127.0.0.1") -> None:
        self.directory = directory
        self.port = port
        self.bind = bind
        self.url = f"redis://127.0.0.1:{port}/0"
        self.log_path = directory / "redis.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._binary = embedded.find_redis_server()

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=2)

    def ping(self) -> bool:
        client = redis.Redis.from_url(
            self.url, socket_timeout=1, socket_connect_timeout=1, retry_on_timeout=False
        )
        try:
            return bool(client.ping())
        except redis.exceptions.RedisError:
            return False
        finally:
            client.close()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, persist: bool = True) -> None:
        assert not self.running, "own Redis is already running"
        if not persist:
            for leftover in ("appendonly.aof", "appendonlydir", "dump.rdb"):
                path = self.directory / leftover
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        command = [
            self._binary,
            "--port", str(self.port),
            "--bind", self.bind,
            "--protected-mode", "no" if self.bind != "127.0.0.1" else "yes",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "yes" if persist else "no",
            "--appendfsync", "always",
            "--daemonize", "no",
            "--logfile", str(self.log_path),
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.starts += 1
        _poll(
            lambda: self.ping() or not self.running, START_TIMEOUT_S, f"redis on port {self.port}"
        )
        if not self.running:
            raise AssertionError(f"own redis-server failed to start:\n{self.log_tail()}")

    def stop(self) -> None:
        """SHUTDOWN NOSAVE (an AOF is still flushed); SIGKILL if it does not go."""
        process = self.process
        if process is None or process.poll() is not None:
            self.process = None
            return
        client = self.client()
        try:
            client.shutdown(nosave=True)
        except redis.exceptions.RedisError:
            pass  # the connection closing under us is the expected answer
        finally:
            client.close()
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=STOP_TIMEOUT_S)
        self.process = None

    def restart(self, persist: bool) -> None:
        self.stop()
        self.start(persist=persist)

    def log_tail(self, lines: int = 20) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    """A Redis of this test's own, started with persistence on; stopped at teardown."""
    directory = tmp_path / "own-redis"
    directory.mkdir()
    server = OwnRedis(directory, free_port())
    server.start(persist=True)
    try:
        yield server
    finally:
        server.stop()


# -------------------------------------------------------------------------------- PostgreSQL


@pytest.fixture
def own_postgres() -> Iterator[OwnPostgres]:
    """A fresh cluster on a free port, migrated to head; stopped and removed at teardown."""
    from worker.db.session import get_engine

    with started_cluster(free_port()) as server:
        try:
            migrate.upgrade(server.url)
            yield server
        finally:
            get_engine(server.url).dispose()
