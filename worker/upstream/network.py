"""The httpx transport of the upstream calls: HTTP/1.1 keep-alive connections on asyncio's own
transports, each response parsed by httptools (llhttp, the parser under uvicorn and Node.js).

httpx's own transport goes through httpcore and h11: a pool, a connection and a state machine
of Python objects per request, and h11's regular expressions per response. Timed on 2026-12-02
(one connection, uvloop, the stand-in's reply), a whole RerankClient call took 0.43 ms of CPU
through httpcore and 0.19 ms through this; httpx.AsyncClient with its own transport, 0.68.
httpx stays the interface: requests, responses and errors are httpx's, and RerankClient uses
this as it would any httpx transport.

What it does not do, because the upstream calls need none of it: HTTP/2, proxies, streaming
bodies (a request body is sent whole, a response is read whole before it is returned), HEAD,
upgrades. A write never waits: asyncio buffers what the peer has not taken yet, and the
`read` timeout bounds the wait for the whole response.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Callable
from typing import NamedTuple, cast

import httptools
import httpx

DEFAULT_PORTS = {b"http": 80, b"https": 443}


class Origin(NamedTuple):
    scheme: bytes
    host: bytes
    port: int


class Answer(NamedTuple):
    status: int
    headers: list[tuple[bytes, bytes]]
    content: bytes
    keep_alive: bool


class Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: a request at a time, its response parsed as the bytes arrive."""

    def __init__(self, origin: Origin, on_closed: Callable[[Connection], None]) -> None:
        self.origin = origin
        self.closed = False
        self._on_closed = on_closed
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._answer: asyncio.Future[Answer] | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._headers_done = False
        self._framed = False  # a length or chunks: the body ends without the connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self._answer is None:
            # Bytes while idle (an idle-timeout 408, say): the connection can't carry another.
            self.close()
            return
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._fail(httpx.RemoteProtocolError(f"malformed response: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._answer is not None and not self._answer.done():
            if self._headers_done and not self._framed:
                self._complete(keep_alive=False)  # a body of no stated length ends with the close
            elif exc is not None:
                self._fail(httpx.ReadError(f"the connection broke: {exc}"))
            else:
                self._fail(httpx.RemoteProtocolError("the server closed before its response"))
        self._on_closed(self)

    def on_message_begin(self) -> None:
        if self._answer is None:  # a response nobody asked for, after the last one
            self.close()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._headers_done = True
        status = self._parser.get_status_code()
        self._framed = (
            status < 200
            or status in (204, 304)
            or any(
                name.lower() == b"content-length"
                or (name.lower() == b"transfer-encoding" and b"chunked" in value.lower())
                for name, value in self._headers
            )
        )

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._parser.get_status_code() < 200:  # an informational answer: the real one follows
            self._next_message()
            return
        self._complete(self._parser.should_keep_alive())

    def _complete(self, keep_alive: bool) -> None:
        answer = Answer(
            self._parser.get_status_code(), self._headers, b"".join(self._body), keep_alive
        )
        self._next_message()
        waiting, self._answer = self._answer, None
        if waiting is not None and not waiting.done():
            waiting.set_result(answer)

    def _next_message(self) -> None:
        self._headers, self._body, self._headers_done = [], [], False

    def _fail(self, error: httpx.TransportError) -> None:
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(error)

    def _time_out(self, timeout: float) -> None:
        self._fail(httpx.ReadTimeout(f"no whole response within {timeout:g}s"))

    async def exchange(self, head: bytes, body: bytes, timeout: float | None) -> Answer:
        """Send one request and wait for its whole response. A connection left by an exchange
        that raised (timed out, broken, or cancelled, even just after its answer came, which
        the caller then never sees to give the connection back) is closed, never used again."""
        assert self._transport is not None
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Answer] = loop.create_future()
        self._answer = answer
        self._transport.write(head + body)
        timer = None if timeout is None else loop.call_later(timeout, self._time_out, timeout)
        try:
            return await answer
        except BaseException:
            self.close()
            raise
        finally:
            if timer is not None:
                timer.cancel()
            self._answer = None

    def close(self) -> None:
        if self._transport is not None and not self.closed:
            self.closed = True
            self._transport.abort()  # connection_lost follows from the loop


def _head(request: httpx.Request, content_length: int) -> bytes:
    """The request line and headers; a header holding a line break would split the request."""
    lines = [b"%s %s HTTP/1.1\r\n" % (request.method.encode("ascii"), request.url.raw_path)]
    for name, value in request.headers.raw:
        if b"\n" in value or b"\r" in value or b"\n" in name or b"\r" in name:
            raise httpx.LocalProtocolError(f"header {name!r} holds a line break", request=request)
        lines.append(b"%s: %s\r\n" % (name, value))
    if content_length and "content-length" not in request.headers:
        lines.append(b"content-length: %d\r\n" % content_length)
    lines.append(b"\r\n")
    return b"".join(lines)


class UpstreamTransport(httpx.AsyncBaseTransport):
    """A pool of at most `max_connections` keep-alive connections, the last used first."""

    def __init__(self, *, max_connections: int, ssl_context: ssl.SSLContext | None = None) -> None:
        self._max_connections = max_connections
        self._ssl_context = ssl_context if ssl_context is not None else httpx.create_ssl_context()
        self._idle: dict[Origin, list[Connection]] = collections.defaultdict(list)
        self._open: set[Connection] = set()
        self._opening = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def open_connections(self) -> int:
        return len(self._open)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.raw_scheme not in DEFAULT_PORTS:
            raise httpx.UnsupportedProtocol(
                f"no {url.scheme!r} here: http or https", request=request
            )
        if request.method == "HEAD":
            raise httpx.UnsupportedProtocol("HEAD is not sent by this transport", request=request)
        origin = Origin(url.raw_scheme, url.raw_host, url.port or DEFAULT_PORTS[url.raw_scheme])
        timeouts = request.extensions.get("timeout", {})
        body = await request.aread()
        head = _head(request, len(body))
        try:
            connection = await self._connection(origin, timeouts)
            answer = await connection.exchange(head, body, timeouts.get("read"))
        except httpx.TransportError as exc:
            exc.request = request
            raise
        if answer.keep_alive and not connection.closed:
            self._idle[origin].append(connection)
            self._wake_one()
        else:
            connection.close()
        return httpx.Response(
            answer.status,
            headers=answer.headers,
            content=answer.content,
            request=request,
            extensions={"http_version": b"HTTP/1.1"},
        )

    async def _connection(self, origin: Origin, timeouts: dict[str, float | None]) -> Connection:
        while True:
            idle = self._idle[origin]
            while idle:
                connection = idle.pop()
                if not connection.closed:
                    return connection
            if len(self._open) + self._opening < self._max_connections:
                return await self._connect(origin, timeouts.get("connect"))
            elsewhere = next((c for o, cs in self._idle.items() if o != origin for c in cs), None)
            if elsewhere is not None:
                elsewhere.close()  # room for this origin; its close wakes a waiter
            await self._wait_for_room(timeouts.get("pool"))

    async def _wait_for_room(self, timeout: float | None) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self._wake_one()  # woken just as it gave up: the room goes to the next waiter
            else:
                waiter.cancel()
            if isinstance(exc, TimeoutError):
                raise httpx.PoolTimeout(f"no connection free within {timeout:g}s") from exc
            raise

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def _connect(self, origin: Origin, timeout: float | None) -> Connection:
        self._opening += 1
        try:
            connection = await self._dial(origin, timeout)
        except BaseException:
            self._wake_one()  # the room it was to take is free again
            raise
        finally:
            self._opening -= 1
        self._open.add(connection)
        return connection

    async def _dial(self, origin: Origin, timeout: float | None) -> Connection:
        loop = asyncio.get_running_loop()
        tls = self._ssl_context if origin.scheme == b"https" else None
        host = origin.host.decode("ascii")
        try:
            async with asyncio.timeout(timeout):
                _, connection = await loop.create_connection(
                    lambda: Connection(origin, self._closed),
                    host,
                    origin.port,
                    ssl=tls,
                    server_hostname=host if tls is not None else None,
                )
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(f"no connection within {timeout:g}s") from exc
        except OSError as exc:  # refused, unreachable, or TLS (ssl.SSLError is an OSError)
            raise httpx.ConnectError(str(exc)) from exc
        return connection

    def _closed(self, connection: Connection) -> None:
        self._open.discard(connection)
        idle = self._idle.get(connection.origin)
        if idle and connection in idle:
            idle.remove(connection)
        self._wake_one()

    async def aclose(self) -> None:
        for connection in list(self._open):
            connection.close()
        await asyncio.sleep(0)  # lets the loop close the sockets before the caller goes on
