"""worker.upstream.network over real loopback sockets, on both loops the engine may run on.

The peers are small asyncio servers in the same process, so each test controls exactly when
the other side sends, stops reading, closes or resets; TLS uses a throwaway CA (trustme).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import httpcore
import httpx
import pytest
import trustme
import uvloop
from conftest import SECRETS

from worker.standin import ThreadedStandin
from worker.upstream.network import HIGH_WATER_BYTES, AsyncioBackend, UpstreamTransport

T = TypeVar("T")
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
Run = Callable[[Coroutine[Any, Any, T]], T]


@pytest.fixture(params=[asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Run[Any]:
    def run_on_loop(coroutine: Coroutine[Any, Any, T]) -> T:
        with asyncio.Runner(loop_factory=request.param) as runner:
            return runner.run(asyncio.wait_for(coroutine, 20))

    return run_on_loop


@contextlib.asynccontextmanager
async def serve(handler: Handler, ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=ssl_context)
    async with server:
        yield server.sockets[0].getsockname()[1]


async def until(predicate: Callable[[], object], what: str, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.005)
    assert predicate(), what


async def read_all(stream: httpcore.AsyncNetworkStream, max_bytes: int = 65536) -> bytes:
    received = bytearray()
    while chunk := await stream.read(max_bytes, timeout=5):
        assert len(chunk) <= max_bytes
        received += chunk
    return bytes(received)


def test_an_idle_connection_knows_the_peer_closed_it_without_reading(run: Run[None]) -> None:
    async def main() -> None:
        close = asyncio.Event()

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await close.wait()
            writer.close()

        async with serve(handler) as port:
            stream = await AsyncioBackend().connect_tcp("127.0.0.1", port)
            assert stream.get_extra_info("is_readable") is False
            assert stream.get_extra_info("server_addr") == ("127.0.0.1", port)
            close.set()
            await until(lambda: stream.get_extra_info("is_readable"), "the peer's close")
            assert await stream.read(1024, timeout=1) == b""
            await stream.aclose()

    run(main())


def test_reads_never_return_more_than_asked_and_lose_nothing(run: Run[None]) -> None:
    payload = os.urandom(3 * HIGH_WATER_BYTES)  # more than the protocol buffers before pausing

    async def main() -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(payload)
            await writer.drain()
            writer.close()

        async with serve(handler) as port:
            stream = await AsyncioBackend().connect_tcp("127.0.0.1", port)
            await until(lambda: stream.get_extra_info("is_readable"), "the first bytes")
            assert await read_all(stream, max_bytes=1000) == payload
            await stream.aclose()

    run(main())


def test_a_silent_peer_is_a_read_timeout(run: Run[None]) -> None:
    async def main() -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()
            writer.close()

        async with serve(handler) as port:
            stream = await AsyncioBackend().connect_tcp("127.0.0.1", port)
            with pytest.raises(httpcore.ReadTimeout):
                await stream.read(1024, timeout=0.1)
            await stream.aclose()

    run(main())


def test_a_reset_connection_is_a_read_error(run: Run[None]) -> None:
    async def main() -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()  # with a zero linger: RST, not FIN

        async with serve(handler) as port:
            stream = await AsyncioBackend().connect_tcp("127.0.0.1", port)
            with pytest.raises(httpcore.ReadError):
                await stream.read(1024, timeout=5)
            with pytest.raises(httpcore.WriteError):
                await stream.write(b"too late", timeout=1)
            await stream.aclose()

    run(main())


def test_a_write_waits_for_the_peer_to_read_and_times_out_if_it_never_does(
    run: Run[None],
) -> None:
    body = os.urandom(32 * 1024 * 1024)  # beyond both sockets' kernel buffers

    async def main() -> None:
        read_now = asyncio.Event()
        received: list[str] = []

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await read_now.wait()
                received.append(hashlib.sha256(await reader.readexactly(len(body))).hexdigest())
            except asyncio.IncompleteReadError:
                pass  # the stalled connection, closed by the client
            finally:
                writer.close()

        async with serve(handler) as port:
            try:
                stalled = await AsyncioBackend().connect_tcp("127.0.0.1", port)
                with pytest.raises(httpcore.WriteTimeout):
                    await stalled.write(body, timeout=0.2)
                await stalled.aclose()
            finally:
                read_now.set()
            stream = await AsyncioBackend().connect_tcp("127.0.0.1", port)
            await stream.write(body, timeout=10)
            await until(lambda: received, "the peer reading the whole body", timeout_s=10)
            assert received[-1] == hashlib.sha256(body).hexdigest()
            await stream.aclose()

    run(main())


def test_nobody_listening_is_a_connect_error(run: Run[None]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused

        async def main() -> None:
            with pytest.raises(httpcore.ConnectError):
                await AsyncioBackend().connect_tcp("127.0.0.1", port, timeout=5)

        run(main())


@pytest.fixture(scope="module")
def certificate_authority() -> trustme.CA:
    return trustme.CA()


def tls_contexts(ca: trustme.CA) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(await reader.readexactly(5))
    await writer.drain()
    writer.close()


def test_tls_is_started_on_the_connection_and_checks_the_name(
    run: Run[None], certificate_authority: trustme.CA
) -> None:
    server_context, client_context = tls_contexts(certificate_authority)

    async def main() -> None:
        async with serve(echo, server_context) as port:
            plain = await AsyncioBackend().connect_tcp("127.0.0.1", port)
            stream = await plain.start_tls(client_context, server_hostname="localhost", timeout=5)
            assert stream.get_extra_info("ssl_object") is not None
            await stream.write(b"hello", timeout=5)
            assert await read_all(stream) == b"hello"
            await stream.aclose()

            plain = await AsyncioBackend().connect_tcp("127.0.0.1", port)
            with pytest.raises(httpcore.ConnectError, match="match"):
                await plain.start_tls(client_context, server_hostname="elsewhere", timeout=5)

    run(main())


HELLO_RESPONSE = (
    b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{"ok":true}'
)


def test_the_transport_speaks_https_and_keeps_connections_alive(
    run: Run[None], certificate_authority: trustme.CA
) -> None:
    server_context, client_context = tls_contexts(certificate_authority)
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        with contextlib.suppress(asyncio.IncompleteReadError):
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(HELLO_RESPONSE)
                await writer.drain()
        writer.close()

    async def main() -> None:
        async with serve(handler, server_context) as port:
            transport = UpstreamTransport(max_connections=2, ssl_context=client_context)
            for _ in range(3):
                response = await transport.handle_async_request(
                    httpx.Request("GET", f"https://localhost:{port}/")
                )
                assert (response.status_code, response.json()) == (200, {"ok": True})
            await transport.aclose()
        assert connections == 1

    run(main())


def test_the_transport_reports_httpx_errors_with_the_request(run: Run[None]) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    async def main() -> None:
        transport = UpstreamTransport(max_connections=1)
        async with serve(silent) as port:
            request = httpx.Request(
                "GET", f"http://127.0.0.1:{port}/", extensions={"timeout": {"read": 0.1}}
            )
            with pytest.raises(httpx.ReadTimeout) as timed_out:
                await transport.handle_async_request(request)
            assert timed_out.value.request is request
        with pytest.raises(httpx.ConnectError):
            await transport.handle_async_request(httpx.Request("GET", f"http://127.0.0.1:{port}/"))
        await transport.aclose()

    run(main())


def test_the_transport_against_the_stand_in(run: Run[None], standin: ThreadedStandin) -> None:
    async def main() -> None:
        transport = UpstreamTransport(max_connections=4)
        request = httpx.Request(
            "POST",
            f"{standin.base_url}/jina/v1/rerank",
            headers={"authorization": f"Bearer {SECRETS['alpha']}"},
            json={"model": "jina-reranker-m0", "query": "q", "documents": ["a", "b", "c"]},
        )
        responses = await asyncio.gather(
            *(transport.handle_async_request(request) for _ in range(8))
        )
        await transport.aclose()
        for response in responses:
            assert response.status_code == 200
            assert sorted(r["index"] for r in response.json()["results"]) == [0, 1, 2]

    run(main())
