"""The slot script's own Redis connection, against real redis-servers: pipelined replies in
order, a script Redis forgot, a connection killed under it, a caller cancelled before its
reply, and the settings a URL gives (database, password, user, unix socket)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from conftest import free_port
from test_key_limits import run

from worker import embedded
from worker.upstream.redis_lane import RedisLane, Script, connection_name

ECHO = Script("return {ARGV[1], redis.call('INCR', KEYS[1] or 'lane:calls')}")
WHERE = Script("redis.call('SET', 'lane:here', ARGV[1]) return redis.call('GET', 'lane:here')")
PASSWORD = "lane-test-password"


@asynccontextmanager
async def lane_on(url: str) -> AsyncIterator[tuple[RedisLane, aioredis.Redis]]:
    client = aioredis.Redis.from_url(url)
    lane = RedisLane(client)
    try:
        yield lane, client
    finally:
        await lane.aclose()
        await client.aclose()


async def lane_connections(client: aioredis.Redis) -> list[dict[str, Any]]:
    """This process's slot script connections, as Redis lists them."""
    return [c for c in await client.client_list() if c["name"] == connection_name()]


def test_concurrent_calls_share_the_connection_and_each_gets_its_own_reply(
    redis_url: str,
) -> None:
    async def main() -> None:
        async with lane_on(redis_url) as (lane, client):
            replies = await asyncio.gather(
                *(lane.run_script(ECHO, [f"caller-{i}"]) for i in range(300))
            )
            assert [reply[0] for reply in replies] == [f"caller-{i}".encode() for i in range(300)]
            assert sorted(reply[1] for reply in replies) == list(range(1, 301))
            # One connection carried them all.
            assert len(await lane_connections(client)) == 1

    run(main)


def test_a_script_redis_forgot_is_sent_whole_and_known_again(redis_url: str) -> None:
    async def main() -> None:
        async with lane_on(redis_url) as (lane, client):
            assert (await lane.run_script(ECHO, ["before"]))[0] == b"before"
            await client.script_flush()
            assert (await lane.run_script(ECHO, ["after"]))[0] == b"after"
            assert await client.script_exists(ECHO.sha) == [True]

    run(main)


def test_a_killed_connection_is_dialled_again_by_the_next_call(redis_url: str) -> None:
    async def main() -> None:
        async with lane_on(redis_url) as (lane, client):
            await lane.run_script(ECHO, ["first"])
            (before,) = await lane_connections(client)
            await client.client_kill_filter(_id=before["id"])
            try:
                reply = await lane.run_script(ECHO, ["again"])
            except redis.exceptions.ConnectionError:  # sent before the loss was seen
                reply = await lane.run_script(ECHO, ["again"])
            assert reply[0] == b"again"
            (after,) = await lane_connections(client)
            assert after["id"] != before["id"]

    run(main)


def test_a_call_in_flight_when_the_connection_drops_fails_as_redis_being_away() -> None:
    """A server that reads the command and hangs up: the caller gets redis-py's
    ConnectionError (which the key pool waits out), not a hang."""

    async def main() -> None:
        async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(1)
            writer.close()

        server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            async with lane_on(f"redis://127.0.0.1:{port}/0") as (lane, _):
                with pytest.raises(redis.exceptions.ConnectionError):
                    await lane.run_script(ECHO, ["dropped"])
        finally:
            server.close()
            await server.wait_closed()

    run(main)


def test_no_redis_at_the_address_is_a_connection_error() -> None:
    async def main() -> None:
        async with lane_on(f"redis://127.0.0.1:{free_port()}/0") as (lane, _):
            with pytest.raises(redis.exceptions.ConnectionError, match="cannot reach Redis"):
                await lane.run_script(ECHO, ["nobody"])

    run(main)


def test_a_caller_cancelled_before_its_reply_hands_the_reply_to_if_abandoned(
    redis_url: str,
) -> None:
    async def main() -> None:
        async with lane_on(redis_url) as (lane, _):
            await lane.run_script(ECHO, ["dialled"])
            abandoned: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            call = asyncio.create_task(
                lane.run_script(ECHO, ["gone"], if_abandoned=abandoned.set_result)
            )
            await asyncio.sleep(0)  # the command is written; its reply has not been read
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            reply = await asyncio.wait_for(abandoned, 5)
            assert reply[0] == b"gone"
            # The connection is still in step: the next reply is the next caller's.
            assert (await lane.run_script(ECHO, ["next"]))[0] == b"next"

    run(main)


def test_the_database_of_the_url_is_selected(redis_url: str) -> None:
    base, db = redis_url.rsplit("/", 1)
    assert db != "0"

    async def main() -> None:
        async with lane_on(redis_url) as (lane, client):
            assert await lane.run_script(WHERE, ["in-db"]) == b"in-db"
            assert await client.get("lane:here") == b"in-db"
        async with lane_on(f"{base}/0") as (_, db_zero):
            assert await db_zero.get("lane:here") != b"in-db"

    run(main)


@contextmanager
def serving(
    command: list[str], probe: redis.Redis, log: Path, unsupported: str | None = None
) -> Iterator[None]:
    """A redis-server of the test's own, from when it answers PING to the end of the block.
    Given `unsupported`, one that exits at once is skipped as a build without what it was
    asked for; else that fails the test."""
    server = subprocess.Popen(
        [*command, "--save", "", "--appendonly", "no", "--logfile", str(log)],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                probe.ping()
                break
            except redis.exceptions.ConnectionError:
                exited = server.poll() is not None
                if exited and unsupported is not None:
                    pytest.skip(f"{unsupported}: {log.read_text()[-300:]}")
                if exited or time.monotonic() > deadline:
                    raise AssertionError(f"redis-server did not start: {log.read_text()}") from None
                time.sleep(0.025)
        yield
    finally:
        probe.close()
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture
def guarded_redis(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A redis-server of this test's own, on a port and a unix socket, with a password for
    the default user and a user 'lane' of its own."""
    port, socket_path = free_port(), tmp_path / "redis.sock"
    command = [
        embedded.find_redis_server(), "--port", str(port), "--bind", "127.0.0.1",
        "--unixsocket", str(socket_path), "--dir", str(tmp_path), "--requirepass", PASSWORD,
        "--user", "lane", "on", f">{PASSWORD}-lane", "~*", "+@all",
    ]  # fmt: skip
    probe = redis.Redis(port=port, password=PASSWORD, socket_connect_timeout=1)
    with serving(command, probe, tmp_path / "redis.log"):
        yield port, socket_path


@pytest.mark.parametrize("form", ["password", "user", "unix socket"])
def test_a_guarded_redis_is_reached_as_the_url_says(
    guarded_redis: tuple[int, Path], form: str
) -> None:
    port, socket_path = guarded_redis
    url = {
        "password": f"redis://:{PASSWORD}@127.0.0.1:{port}/2",
        "user": f"redis://lane:{PASSWORD}-lane@127.0.0.1:{port}/2",
        "unix socket": f"unix://:{PASSWORD}@{socket_path}?db=2",
    }[form]

    async def main() -> None:
        async with lane_on(url) as (lane, client):
            assert await lane.run_script(WHERE, [form]) == form.encode()
            assert await client.get("lane:here") == form.encode()

    run(main)


def test_a_wrong_password_is_an_authentication_error(guarded_redis: tuple[int, Path]) -> None:
    port, _ = guarded_redis

    async def main() -> None:
        async with lane_on(f"redis://:wrong@127.0.0.1:{port}/0") as (lane, _):
            with pytest.raises(redis.exceptions.AuthenticationError):
                await lane.run_script(ECHO, ["refused"])

    run(main)


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[int]:
    """A redis-server of this test's own serving TLS only, with a self-signed certificate;
    skipped where no redis-server built with TLS, or no openssl, is on the machine."""
    server_binary = shutil.which("redis-server", path="/usr/bin:/usr/local/bin")
    if server_binary is None or shutil.which("openssl") is None:
        pytest.skip("needs a redis-server built with TLS (Debian's) and openssl")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    port = free_port()
    command = [
        server_binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
        "--tls-cert-file", str(cert), "--tls-key-file", str(key),
        "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no", "--dir", str(tmp_path),
    ]  # fmt: skip
    probe = redis.Redis(port=port, ssl=True, ssl_cert_reqs="none", socket_connect_timeout=1)
    with serving(command, probe, tmp_path / "redis.log", "this redis-server does not serve TLS"):
        yield port


def test_a_tls_redis_is_reached_over_tls(tls_redis: int) -> None:
    async def main() -> None:
        url = f"rediss://127.0.0.1:{tls_redis}/0?ssl_cert_reqs=none"
        async with lane_on(url) as (lane, client):
            assert await lane.run_script(WHERE, ["over TLS"]) == b"over TLS"
            assert await client.get("lane:here") == b"over TLS"

    run(main)
