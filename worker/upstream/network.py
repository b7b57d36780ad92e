"""An httpcore network backend on asyncio's own transports, and an httpx transport that uses it.

httpcore reaches asyncio through anyio streams. Each socket operation then pays for a cancel
scope with its own timer, a checkpoint and exception mapping, and every request asks each idle
pooled connection whether it is still open with a `poll()` syscall (encode/httpx#3215,
encode/httpcore#930). Here the protocol reads into a buffer as data arrives: a read that finds
data returns at once, a write waits only when the transport pushes back, and an idle
connection's state is known without a syscall. httpx's own transport takes no network backend
yet (encode/httpx#3749), so `UpstreamTransport` puts an httpcore pool with this backend behind
httpx's transport interface.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import ssl
from collections.abc import Iterable
from typing import Any, cast

import httpcore
import httpx

# Reading stops while this much is buffered unread, and resumes below the low mark.
HIGH_WATER_BYTES = 256 * 1024
LOW_WATER_BYTES = 64 * 1024


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


class _BufferingProtocol(asyncio.Protocol):
    """Keeps what the socket delivers until the stream reads it, and says when writing may go on."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.eof = False
        self.error: Exception | None = None
        self.reader: asyncio.Future[None] | None = None
        self.writable: asyncio.Future[None] | None = None
        self._reading_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        self.buffered += len(data)
        if self.buffered > HIGH_WATER_BYTES and not self._reading_paused and self.transport:
            self._reading_paused = True
            self.transport.pause_reading()
        _wake(self.reader)

    def eof_received(self) -> bool:
        self.eof = True
        _wake(self.reader)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.error = exc
        _wake(self.reader)
        _wake(self.writable)

    def pause_writing(self) -> None:
        self.writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        writable, self.writable = self.writable, None
        _wake(writable)

    def take(self, max_bytes: int) -> bytes:
        data = self.chunks.popleft()
        if len(data) > max_bytes:
            data, rest = data[:max_bytes], data[max_bytes:]
            self.chunks.appendleft(rest)
        self.buffered -= len(data)
        if self._reading_paused and self.buffered < LOW_WATER_BYTES and self.transport:
            self._reading_paused = False
            self.transport.resume_reading()
        return data


async def _wait(waiter: asyncio.Future[None], timeout: float | None) -> None:
    """Wait for the waiter, or until the timeout wakes it; the caller tells which from state."""
    timer = None
    if timeout is not None:
        timer = asyncio.get_running_loop().call_later(timeout, _wake, waiter)
    try:
        await waiter
    finally:
        if timer is not None:
            timer.cancel()


class AsyncioStream(httpcore.AsyncNetworkStream):
    def __init__(self, transport: asyncio.Transport, protocol: _BufferingProtocol) -> None:
        self._transport = transport
        self._protocol = protocol

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        protocol = self._protocol
        if not protocol.chunks and not protocol.eof:
            protocol.reader = asyncio.get_running_loop().create_future()
            try:
                await _wait(protocol.reader, timeout)
            finally:
                protocol.reader = None
        if protocol.chunks:
            return protocol.take(max_bytes)
        if not protocol.eof:
            raise httpcore.ReadTimeout(f"no data within {timeout:g}s")
        if protocol.error is not None:
            raise httpcore.ReadError(str(protocol.error)) from protocol.error
        return b""

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        protocol = self._protocol
        if protocol.error is not None or self._transport.is_closing():
            raise httpcore.WriteError(f"the connection is closed: {protocol.error}")
        self._transport.write(buffer)
        paused = protocol.writable
        if paused is not None:
            await _wait(paused, timeout)
            if self._transport.is_closing():
                raise httpcore.WriteError(f"the connection closed: {protocol.error}")
            if protocol.writable is paused:
                raise httpcore.WriteTimeout(f"the peer took no data within {timeout:g}s")

    async def aclose(self) -> None:
        if not self._transport.is_closing():
            self._transport.close()
            await asyncio.sleep(0)  # lets the loop close the socket before the caller goes on
        self._transport.abort()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> AsyncioStream:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                transport = await loop.start_tls(
                    self._transport, self._protocol, ssl_context, server_hostname=server_hostname
                )
        except TimeoutError as exc:
            self._transport.abort()
            raise httpcore.ConnectTimeout(f"TLS handshake took over {timeout:g}s") from exc
        except (OSError, ssl.SSLError) as exc:
            self._transport.abort()
            raise httpcore.ConnectError(str(exc)) from exc
        assert transport is not None
        self._protocol.transport = transport
        return AsyncioStream(transport, self._protocol)

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":  # on an idle HTTP/1.1 connection: the server closed it
            return bool(self._protocol.chunks) or self._protocol.eof
        name = {"client_addr": "sockname", "server_addr": "peername"}.get(info, info)
        if name in ("ssl_object", "sockname", "peername", "socket"):
            return self._transport.get_extra_info(name)
        return None


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> AsyncioStream:
        local_addr = None if local_address is None else (local_address, 0)
        return await self._connect(
            lambda loop: loop.create_connection(
                _BufferingProtocol, host, port, local_addr=local_addr
            ),
            timeout,
            socket_options,
        )

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> AsyncioStream:
        return await self._connect(
            lambda loop: loop.create_unix_connection(_BufferingProtocol, path),
            timeout,
            socket_options,
        )

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    @staticmethod
    async def _connect(
        connect: Any, timeout: float | None, socket_options: Iterable[httpcore.SOCKET_OPTION] | None
    ) -> AsyncioStream:
        try:
            async with asyncio.timeout(timeout):
                transport, protocol = await connect(asyncio.get_running_loop())
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(f"no connection within {timeout:g}s") from exc
        except OSError as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        sock: socket.socket = transport.get_extra_info("socket")
        for option in socket_options or ():
            sock.setsockopt(*option)
        return AsyncioStream(transport, protocol)


_HTTPX_ERRORS: dict[type[Exception], type[httpx.TransportError]] = {
    httpcore.PoolTimeout: httpx.PoolTimeout,
    httpcore.ConnectTimeout: httpx.ConnectTimeout,
    httpcore.ReadTimeout: httpx.ReadTimeout,
    httpcore.WriteTimeout: httpx.WriteTimeout,
    httpcore.ConnectError: httpx.ConnectError,
    httpcore.ReadError: httpx.ReadError,
    httpcore.WriteError: httpx.WriteError,
    httpcore.RemoteProtocolError: httpx.RemoteProtocolError,
    httpcore.LocalProtocolError: httpx.LocalProtocolError,
    httpcore.UnsupportedProtocol: httpx.UnsupportedProtocol,
}


class UpstreamTransport(httpx.AsyncBaseTransport):
    """httpx's transport interface over an httpcore pool on `AsyncioBackend`.

    The response body is read before the response is returned, so every network error surfaces
    here, mapped to httpx's exception of the same name.
    """

    def __init__(self, *, max_connections: int, ssl_context: ssl.SSLContext | None = None) -> None:
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context if ssl_context is not None else httpx.create_ssl_context(),
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            network_backend=AsyncioBackend(),
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        try:
            response = await self._pool.request(
                request.method,
                httpcore.URL(
                    scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path
                ),
                headers=request.headers.raw,
                content=request.content,
                extensions=request.extensions,
            )
        except tuple(_HTTPX_ERRORS) as exc:
            mapped = next(to for fro, to in _HTTPX_ERRORS.items() if isinstance(exc, fro))
            raise mapped(str(exc), request=request) from exc
        return httpx.Response(
            response.status,
            headers=response.headers,
            content=response.content,
            request=request,
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self._pool.aclose()
