"""The key pool's own Redis connection for its slot script: commands pipelined on one
connection, replies read by hiredis in an asyncio protocol.

Every upstream call takes its slot with one script call, the engine's busiest round trip.
Through redis-py's asyncio client, one EVALSHA with the slot script's arguments cost 107 µs
of the caller's CPU (2026-12-03, uvloop, a local Redis): its retry wrapper, observability
hooks, a pooled connection per command and a stream reader. Here it costs 41 µs. Replies
come in the order the commands went, so concurrent takers share the one connection through
a queue of futures, with no pool. Everything else stays on redis-py, whose connection
settings (address or unix socket, user, password, database, TLS) this reads.

No retries here: a lost connection fails the commands in flight with redis-py's
ConnectionError and the next command dials again; the key pool waits Redis outages out.
A command whose caller was cancelled before its reply came still gets its reply, which the
caller's `if_abandoned` is given (a slot the script took can then be given back).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import os
from collections.abc import Callable, Sequence
from typing import Any, cast

import hiredis
import redis
import redis.asyncio as aioredis
from redis._parsers import BaseParser
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection

Arg = bytes | str | int | float
Abandoned = Callable[[Any], None]


class Script:
    """A Lua script, sent by its SHA1 once Redis knows it."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


class _Replies(asyncio.Protocol):
    """One connection: commands written as they come, each reply to the oldest waiter."""

    def __init__(self) -> None:
        self.lost: str | None = None  # why the connection is gone
        self._transport: asyncio.Transport | None = None
        self._reader = hiredis.Reader()
        self._waiting: collections.deque[tuple[asyncio.Future[Any], Abandoned | None]] = (
            collections.deque()
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        try:
            while (reply := self._reader.gets()) is not False:
                waiter, if_abandoned = self._waiting.popleft()
                if not waiter.done():
                    waiter.set_result(reply)
                elif if_abandoned is not None and waiter.cancelled():
                    if_abandoned(reply)
        except hiredis.ProtocolError:
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = (
            self.lost or f"Redis connection lost ({type(exc).__name__ if exc else 'closed'})"
        )
        while self._waiting:
            waiter, _ = self._waiting.popleft()
            if not waiter.done():
                waiter.set_exception(redis.exceptions.ConnectionError(self.lost))

    def send(self, command: Sequence[Arg], if_abandoned: Abandoned | None) -> asyncio.Future[Any]:
        if self.lost is not None:
            raise redis.exceptions.ConnectionError(self.lost)
        assert self._transport is not None
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.append((waiter, if_abandoned))
        # hiredis's stub types the tuple as one of a single element.
        self._transport.write(hiredis.pack_command(tuple(command)))  # type: ignore[arg-type]
        return waiter

    def close(self) -> None:
        """Drop the connection; the commands in flight fail, the next one dials anew."""
        self.lost = self.lost or "Redis connection closed"
        if self._transport is not None:
            self._transport.abort()


class RedisLane:
    """Script calls on a connection of their own, dialled on first use and after a loss."""

    def __init__(self, client: aioredis.Redis, timeout_s: float = 10.0) -> None:
        pool = client.connection_pool
        self._connection_class = pool.connection_class
        self._settings = dict(pool.connection_kwargs)
        self._timeout_s = timeout_s
        self._replies: _Replies | None = None
        self._dialing: asyncio.Lock | None = None

    async def run_script(
        self, script: Script, args: Sequence[Arg], if_abandoned: Abandoned | None = None
    ) -> Any:
        try:
            return await self._execute(("EVALSHA", script.sha, 0, *args), if_abandoned)
        except redis.exceptions.NoScriptError:  # a Redis that restarted forgot it
            return await self._execute(("EVAL", script.source, 0, *args), if_abandoned)

    async def aclose(self) -> None:
        if self._replies is not None:
            self._replies.close()
            self._replies = None

    async def _execute(self, command: Sequence[Arg], if_abandoned: Abandoned | None) -> Any:
        replies = await self._connected()
        waiter = replies.send(command, if_abandoned)
        try:
            async with asyncio.timeout(self._timeout_s):
                reply = await waiter
        except TimeoutError as exc:
            replies.close()  # a connection that went silent: the next command dials anew
            raise redis.exceptions.TimeoutError(
                f"no reply from Redis in {self._timeout_s:g}s"
            ) from exc
        except asyncio.CancelledError:
            # Cancelled after the reply came but before this resumed: it is abandoned too.
            answered = waiter.done() and not waiter.cancelled() and waiter.exception() is None
            if if_abandoned is not None and answered:
                if_abandoned(waiter.result())
            raise
        return _answer(reply)

    async def _connected(self) -> _Replies:
        replies = self._replies
        if replies is not None and replies.lost is None:
            return replies
        if self._dialing is None:
            self._dialing = asyncio.Lock()
        async with self._dialing:
            if self._replies is None or self._replies.lost is not None:
                self._replies = await self._dial()
            return self._replies

    async def _dial(self) -> _Replies:
        loop = asyncio.get_running_loop()
        settings = self._settings
        try:
            async with asyncio.timeout(self._timeout_s):
                if issubclass(self._connection_class, UnixDomainSocketConnection):
                    _, replies = await loop.create_unix_connection(_Replies, settings["path"])
                else:
                    tls = None
                    if issubclass(self._connection_class, SSLConnection):
                        tls = self._connection_class(**settings).ssl_context.get()
                    _, replies = await loop.create_connection(
                        _Replies, settings.get("host", "localhost"), settings.get("port", 6379),
                        ssl=tls,
                    )  # fmt: skip
                try:
                    await self._handshake(replies)
                except BaseException:
                    replies.close()
                    raise
        except (OSError, TimeoutError) as exc:
            raise redis.exceptions.ConnectionError(
                f"cannot reach Redis ({type(exc).__name__}: {exc})"
            ) from exc
        return replies

    async def _handshake(self, replies: _Replies) -> None:
        """AUTH and SELECT as the URL asks, and a name that CLIENT LIST shows, sent together."""
        settings = self._settings
        commands: list[tuple[Arg, ...]] = []
        if settings.get("password"):
            user = settings.get("username")
            password = settings["password"]
            commands.append(("AUTH", user, password) if user else ("AUTH", password))
        if settings.get("db"):
            commands.append(("SELECT", settings["db"]))
        commands.append(("CLIENT", "SETNAME", connection_name()))
        for waiter in [replies.send(command, None) for command in commands]:
            _answer(await waiter)


def connection_name() -> str:
    """What CLIENT LIST calls this process's slot script connection."""
    return f"rerank-slots-{os.getpid()}"


def _answer(reply: Any) -> Any:
    """The reply, or redis-py's exception for an error reply, from redis-py's own table."""
    if isinstance(reply, hiredis.ReplyError):
        raise BaseParser.parse_error(str(reply))  # type: ignore[no-untyped-call]
    return reply
