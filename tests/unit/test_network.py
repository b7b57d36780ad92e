"""worker.upstream.network over real loopback sockets, on both loops the engine may run on.

The peers are small asyncio servers in the same process, so each test controls exactly what
the other side sends, and when it stops, closes or resets; TLS uses a throwaway CA (trustme).
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

import httpx
import pytest
import trustme
import uvloop
from conftest import SECRETS

from worker.standin import ThreadedStandin
from worker.upstream.network import Connection, UpstreamTransport

T = TypeVar("T")
Run = Callable[[Coroutine[Any, Any, T]], T]
Script = Callable[["Peer", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture(params=[asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Run[Any]:
    def run_on_loop(coroutine: Coroutine[Any, Any, T]) -> T:
        with asyncio.Runner(loop_factory=request.param) as runner:
            return runner.run(asyncio.wait_for(coroutine, 20))

    return run_on_loop


class Peer:
    """A server playing a script on each connection; it counts connections and requests."""

    def __init__(self, script: Script) -> None:
        self.connections = 0
        self.open = 0
        self.most_open = 0
        self.requests: list[tuple[bytes, bytes]] = []
        self._script = script

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            await self._script(self, reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client went away
        finally:
            self.open -= 1
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        """The next request's head, after reading its body whole; the body is kept."""
        head = await reader.readuntil(b"\r\n\r\n")
        lengths = [
            int(line.split(b":", 1)[1])
            for line in head.lower().split(b"\r\n")
            if line.startswith(b"content-length:")
        ]
        self.requests.append((head, await reader.readexactly(lengths[0] if lengths else 0)))
        return head


@contextlib.asynccontextmanager
async def serve(peer: Peer, ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[int]:
    server = await asyncio.start_server(peer, "127.0.0.1", 0, ssl=ssl_context)
    async with server:
        yield server.sockets[0].getsockname()[1]


async def until(predicate: Callable[[], object], what: str, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.005)
    assert predicate(), what


def ok(body: bytes, *headers: bytes) -> bytes:
    extra = b"".join(header + b"\r\n" for header in headers)
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n%s" % (len(body), extra, body)


async def numbered(peer: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Keep-alive: each request is answered with its number."""
    while True:
        await peer.read_request(reader)
        writer.write(ok(b'{"n":%d}' % len(peer.requests)))
        await writer.drain()


def holding(release: asyncio.Event, held: Callable[[Peer, bytes], bool]) -> Script:
    """Keep-alive, each request answered with its number; a request `held` says so of (given
    the peer and the request's head) only once `release` is set."""

    async def handler(
        peer: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while True:
            head = await peer.read_request(reader)
            if held(peer, head):
                await release.wait()
            writer.write(ok(b"%d" % len(peer.requests)))
            await writer.drain()

    return handler


def post(port: int, body: bytes = b"{}", **timeouts: float) -> httpx.Request:
    return httpx.Request(
        "POST", f"http://127.0.0.1:{port}/rerank", content=body, extensions={"timeout": timeouts}
    )


def test_a_connection_is_kept_alive_and_each_request_gets_its_own_answer(run: Run[None]) -> None:
    peer = Peer(numbered)

    async def main() -> list[Any]:
        async with serve(peer) as port:
            transport = UpstreamTransport(max_connections=2)
            answers = []
            for i in range(3):
                request = httpx.Request(
                    "POST",
                    f"http://127.0.0.1:{port}/rerank?v=1",
                    headers={"authorization": "Bearer x"},
                    content=b'{"q":%d}' % i,
                )
                answers.append((await transport.handle_async_request(request)).json())
            await transport.aclose()
            return answers

    assert run(main()) == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert peer.connections == 1
    head, body = peer.requests[2]
    assert head.startswith(b"POST /rerank?v=1 HTTP/1.1\r\n")
    assert {b"authorization: bearer x", b"content-length: 7"} <= set(head.lower().split(b"\r\n"))
    assert body == b'{"q":2}'


def test_a_connection_the_server_closed_while_idle_is_not_used_again(run: Run[None]) -> None:
    async def once(peer: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await peer.read_request(reader)
        writer.write(ok(b'{"ok":true}'))  # says nothing of closing, then closes
        await writer.drain()

    peer = Peer(once)

    async def main() -> None:
        async with serve(peer) as port:
            transport = UpstreamTransport(max_connections=1)
            first = await transport.handle_async_request(post(port))
            await until(
                lambda: not transport.open_connections, "the client seeing the server's close"
            )
            second = await transport.handle_async_request(post(port))
            await transport.aclose()
        assert first.json() == second.json() == {"ok": True}

    run(main())
    assert peer.connections == 2


def test_large_chunked_and_unframed_bodies_are_read_whole(run: Run[None]) -> None:
    payload = os.urandom(3 * 1024 * 1024)  # arrives in many reads
    pieces = [payload[i : i + 70_000] for i in range(0, len(payload), 70_000)]

    async def three(peer: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await peer.read_request(reader)
        writer.write(ok(payload))
        await peer.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for piece in pieces:
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await peer.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n\r\n" + payload)  # no length: it ends with the close
        await writer.drain()

    peer = Peer(three)

    async def main() -> list[bytes]:
        async with serve(peer) as port:
            transport = UpstreamTransport(max_connections=1)
            answers = [await transport.handle_async_request(post(port)) for _ in range(3)]
            last_closed = transport.open_connections == 0
            await transport.aclose()
        assert last_closed, "a connection whose body ended with its close is not kept"
        return [await answer.aread() for answer in answers]

    digests = {hashlib.sha256(body).hexdigest() for body in run(main())}
    assert digests == {hashlib.sha256(payload).hexdigest()}
    assert peer.connections == 1


def test_a_response_that_says_close_or_says_more_than_asked_leaves_its_connection_unused(
    run: Run[None],
) -> None:
    async def closing(
        peer: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        head = await peer.read_request(reader)
        if peer.connections == 1:
            writer.write(ok(b"1", b"connection: close"))
        else:  # a second, unasked response in the same write
            writer.write(ok(b"%d" % peer.connections) + ok(b"unasked"))
        await writer.drain()
        assert head
        await reader.read()

    peer = Peer(closing)

    async def main() -> list[bytes]:
        async with serve(peer) as port:
            transport = UpstreamTransport(max_connections=1)
            answers = [(await transport.handle_async_request(post(port))).content for _ in range(3)]
            await transport.aclose()
            return answers

    assert run(main()) == [b"1", b"2", b"3"]
    assert peer.connections == 3


def test_an_informational_response_is_skipped(run: Run[None]) -> None:
    async def early(peer: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await peer.read_request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"final"))
        await reader.read()

    async def main() -> httpx.Response:
        async with serve(Peer(early)) as port:
            transport = UpstreamTransport(max_connections=1)
            answer = await transport.handle_async_request(post(port))
            await transport.aclose()
            return answer

    answer = run(main())
    assert (answer.status_code, answer.content) == (200, b"final")


def test_a_silent_peer_is_a_read_timeout_and_its_connection_is_dropped(run: Run[None]) -> None:
    async def silent(
        peer: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await peer.read_request(reader)
        await reader.read()

    peer = Peer(silent)

    async def main() -> None:
        async with serve(peer) as port:
            transport = UpstreamTransport(max_connections=1)
            request = post(port, read=0.1)
            with pytest.raises(httpx.ReadTimeout) as timed_out:
                await transport.handle_async_request(request)
            assert timed_out.value.request is request
            await until(lambda: peer.open == 0, "the timed-out connection closed")
            await transport.aclose()

    run(main())


def test_a_request_cancelled_mid_response_leaves_no_late_answer_for_the_next(
    run: Run[None],
) -> None:
    release = asyncio.Event()
    peer = Peer(holding(release, lambda peer, _: len(peer.requests) == 1))

    async def main() -> bytes:
        async with serve(peer) as port:
            transport = UpstreamTransport(max_connections=1)
            first = asyncio.ensure_future(transport.handle_async_request(post(port)))
            await until(lambda: peer.requests, "the first request at the server")
            first.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await first
            release.set()
            second = await transport.handle_async_request(post(port))
            await transport.aclose()
            return second.content

    assert run(main()) == b"2"
    assert peer.connections == 2


def test_a_request_cancelled_just_after_its_answer_came_gives_its_connection_up(
    run: Run[None], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The answer is in, but the caller is cancelled before it resumes (a timeout of its own,
    say): it never sees the answer to hand the connection back, so the exchange closes it."""
    to_cancel: list[asyncio.Future[httpx.Response]] = []
    complete = Connection._complete

    def complete_then_cancel(connection: Connection, keep_alive: bool) -> None:
        complete(connection, keep_alive)
        while to_cancel:
            to_cancel.pop().cancel()

    monkeypatch.setattr(Connection, "_complete", complete_then_cancel)
    peer = Peer(numbered)

    async def main() -> bytes:
        async with serve(peer) as port:
            transport = UpstreamTransport(max_connections=1)
            first = asyncio.ensure_future(transport.handle_async_request(post(port)))
            to_cancel.append(first)
            with pytest.raises(asyncio.CancelledError):
                await first
            second = await transport.handle_async_request(post(port, pool=2.0))
            await transport.aclose()
            return second.content

    assert run(main()) == b'{"n":2}'
    assert peer.connections == 2


@pytest.mark.parametrize(
    ("behaviour", "error"),
    [
        ("reset", httpx.ReadError),
        ("close", httpx.RemoteProtocolError),
        ("garbage", httpx.RemoteProtocolError),
        ("half", httpx.RemoteProtocolError),
    ],
)
def test_a_broken_response_is_the_httpx_error_of_its_kind(
    run: Run[None], behaviour: str, error: type[httpx.TransportError]
) -> None:
    async def breaks(
        peer: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await peer.read_request(reader)
        if behaviour == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()  # with a zero linger: RST, not FIN
        elif behaviour == "garbage":
            writer.write(b"SMTP ready\r\n\r\n")
            await reader.read()
        elif behaviour == "half":
            writer.write(ok(b"0123456789")[:-4])  # closes six bytes into a ten-byte body

    async def main() -> None:
        async with serve(Peer(breaks)) as port:
            transport = UpstreamTransport(max_connections=1)
            request = post(port)
            with pytest.raises(error) as failed:
                await transport.handle_async_request(request)
            assert failed.value.request is request
            await transport.aclose()

    run(main())


def test_nobody_listening_is_a_connect_error(run: Run[None]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused

        async def main() -> None:
            transport = UpstreamTransport(max_connections=1)
            with pytest.raises(httpx.ConnectError):
                await transport.handle_async_request(post(port, connect=5))
            assert transport.open_connections == 0

        run(main())


def test_a_header_with_a_line_break_is_refused_before_anything_is_sent(run: Run[None]) -> None:
    peer = Peer(numbered)

    async def main() -> None:
        async with serve(peer) as port:
            transport = UpstreamTransport(max_connections=1)
            request = httpx.Request(
                "POST",
                f"http://127.0.0.1:{port}/",
                headers={"authorization": "Bearer x\r\nx-injected: 1"},
            )
            with pytest.raises(httpx.LocalProtocolError, match="authorization"):
                await transport.handle_async_request(request)
            await transport.aclose()

    run(main())
    assert peer.connections == 0


def test_requests_beyond_the_pool_wait_for_a_connection_or_time_out(run: Run[None]) -> None:
    held = asyncio.Event()
    peer = Peer(holding(held, lambda _, head: b"/hold" in head))

    async def main() -> None:
        async with serve(peer) as port:
            transport = UpstreamTransport(max_connections=2)
            answers = await asyncio.gather(
                *(transport.handle_async_request(post(port)) for _ in range(8))
            )
            assert sorted(int(a.content) for a in answers) == list(range(1, 9))
            assert peer.most_open == 2

            one = UpstreamTransport(max_connections=1)
            holding = asyncio.ensure_future(
                one.handle_async_request(httpx.Request("POST", f"http://127.0.0.1:{port}/hold"))
            )
            await until(lambda: len(peer.requests) == 9, "the held request at the server")
            with pytest.raises(httpx.PoolTimeout):
                await one.handle_async_request(post(port, pool=0.1))
            held.set()
            assert (await holding).status_code == 200
            assert (await one.handle_async_request(post(port))).content == b"10"
            await one.aclose()
            await transport.aclose()

    run(main())


@pytest.fixture(scope="module")
def certificate_authority() -> trustme.CA:
    return trustme.CA()


def test_https_checks_the_name_and_keeps_its_connection_alive(
    run: Run[None], certificate_authority: trustme.CA
) -> None:
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    certificate_authority.issue_cert("localhost").configure_cert(server_context)
    client_context = ssl.create_default_context()
    certificate_authority.configure_trust(client_context)
    peer = Peer(numbered)

    async def main() -> None:
        async with serve(peer, server_context) as port:
            transport = UpstreamTransport(max_connections=2, ssl_context=client_context)
            for n in (1, 2, 3):
                answer = await transport.handle_async_request(
                    httpx.Request("POST", f"https://localhost:{port}/", content=b"{}")
                )
                assert answer.json() == {"n": n}
            with pytest.raises(httpx.ConnectError, match="match"):
                await transport.handle_async_request(
                    httpx.Request("POST", f"https://127.0.0.1:{port}/", content=b"{}")
                )
            await transport.aclose()

    run(main())
    # Three answers over one connection; the handshake refused for its name never reached
    # the server's handler (asyncio calls it only after a handshake that succeeded).
    assert peer.connections == 1


def test_a_body_larger_than_the_socket_buffers_arrives_whole(run: Run[None]) -> None:
    body = os.urandom(32 * 1024 * 1024)

    async def digest(
        peer: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await peer.read_request(reader)
        writer.write(ok(hashlib.sha256(peer.requests[-1][1]).hexdigest().encode()))
        await writer.drain()

    async def main() -> bytes:
        async with serve(Peer(digest)) as port:
            transport = UpstreamTransport(max_connections=1)
            answer = await transport.handle_async_request(post(port, body))
            await transport.aclose()
            return answer.content

    assert run(main()) == hashlib.sha256(body).hexdigest().encode()


def test_the_transport_against_the_stand_in(run: Run[None], standin: ThreadedStandin) -> None:
    async def main() -> list[httpx.Response]:
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
        return responses

    for response in run(main()):
        assert response.status_code == 200
        assert sorted(r["index"] for r in response.json()["results"]) == [0, 1, 2]
