"""HTTP/1.1 stand-in for 302.AI's Jina rerank API on asyncio + h11, with connection-level faults.

All state lives on the server's event loop, so nothing needs a lock; `ThreadedStandin` hops onto
that loop for every call made from another thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
import http
import itertools
import json
import logging
import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from types import TracebackType
from typing import Any, TypeVar

import h11

from worker.standin import usage_shapes
from worker.standin.config import StandinConfig
from worker.standin.scoring import Document, count_tokens, rank

log = logging.getLogger(__name__)

RERANK_PATHS = frozenset({"/jina/v1/rerank", "/v1/rerank"})
SUPPORTED_MODELS = frozenset(
    {
        "jina-reranker-m0",
        "jina-reranker-v2-base-multilingual",
        "jina-reranker-v1-base-en",
        "jina-reranker-v1-turbo-en",
        "jina-reranker-v1-tiny-en",
        "jina-reranker-v3",
        "bge-reranker-v2-m3",
        "bce-reranker-base_v1",
        *usage_shapes.DEFAULT_SHAPES,
    }
)
MAX_BODY_BYTES = 64 * 1024 * 1024
_READ_CHUNK_BYTES = 64 * 1024
_THREAD_CALL_TIMEOUT_S = 10.0

_T = TypeVar("_T")
Headers = Iterable[tuple[bytes, bytes]]


@dataclass(frozen=True)
class _Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


def _json_response(
    status: int, payload: object, headers: tuple[tuple[str, str], ...] = ()
) -> _Response:
    return _Response(status, json.dumps(payload, ensure_ascii=False).encode(), headers=headers)


def _api_error(err_code: int, message: str, message_cn: str) -> dict[str, Any]:
    """302.AI's own error envelope, used where the proxy (not Jina) answers."""
    return {
        "error": {
            "err_code": err_code,
            "message": message,
            "message_cn": message_cn,
            "type": "api_error",
        }
    }


_NOT_FOUND = _json_response(404, {"detail": "Not Found"})
_MISSING_KEY = _json_response(401, _api_error(-10001, "Missing API key", "缺少API Key"))
_INVALID_KEY = _json_response(
    401, _api_error(-10005, "Invalid or expired API key", "API Key无效或已过期")
)
_INSUFFICIENT_BALANCE = _json_response(
    403, {"detail": "AUTHZ_INSUFFICIENT_BALANCE: account balance is insufficient"}
)
_REVOKED = {401: _INVALID_KEY, 403: _INSUFFICIENT_BALANCE}
_SERVER_ERRORS = (
    _Response(503, b"<html><body><h1>503 Service Unavailable</h1></body></html>", "text/html"),
    _json_response(502, _api_error(-10003, "network error", "网络错误")),
    _json_response(500, {"detail": "Internal Server Error"}),
)


class _Rejected(Exception):
    """Carries the error answer for a request that cannot be served."""

    def __init__(self, response: _Response) -> None:
        super().__init__(response.status)
        self.response = response


_RATE_LIMIT_EXCEEDED = {"detail": "Rate limit exceeded"}


def _bad_request(detail: str) -> _Rejected:
    return _Rejected(_json_response(400, {"detail": detail}))


def _unprocessable(detail: str) -> _Rejected:
    return _Rejected(_json_response(422, {"detail": detail}))


def _rate_limited(retry_after_s: float, payload: object = _RATE_LIMIT_EXCEEDED) -> _Response:
    """Whole seconds in Retry-After (the HTTP grammar); sub-second waits also in retry-after-ms."""
    headers = [("retry-after", str(math.ceil(retry_after_s)))]
    if retry_after_s < 1:
        headers.append(("retry-after-ms", str(round(retry_after_s * 1000))))
    return _json_response(429, payload, tuple(headers))


def _billed_tokens(request: RerankRequest, config: StandinConfig) -> int:
    """What the call bills, by the stand-in's own count (not rerank-worker's estimate)."""
    tokens = sum(count_tokens(request.query, doc, config.image_tokens) for doc in request.documents)
    return round(tokens * config.token_factor)


@dataclass(frozen=True)
class RerankRequest:
    model: str
    query: str
    documents: list[Document]
    top_n: int | None
    return_documents: bool


def parse_rerank_request(body: bytes, max_documents: int) -> RerankRequest:
    """Validate like Jina: a 400 naming the bad field, or a 422 when the body is not JSON."""
    payload = _json_object(body)
    model = payload.get("model")
    if not isinstance(model, str):
        raise _bad_request("field 'model' is required and must be a string")
    if model not in SUPPORTED_MODELS:
        raise _bad_request(f"model '{model}' is not supported")
    query = payload.get("query")
    if not isinstance(query, str) or not query:
        raise _bad_request("field 'query' must be a non-empty string")
    return RerankRequest(
        model=model,
        query=query,
        documents=_documents(payload.get("documents"), max_documents),
        top_n=_top_n(payload.get("top_n")),
        return_documents=_return_documents(payload.get("return_documents")),
    )


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body)
    except ValueError:
        raise _unprocessable("request body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise _unprocessable("request body must be a JSON object")
    return payload


def _documents(value: object, max_documents: int) -> list[Document]:
    if not isinstance(value, list) or not value:
        raise _bad_request("field 'documents' must be a non-empty list")
    if len(value) > max_documents:
        raise _bad_request(
            f"field 'documents' has {len(value)} items, more than the maximum of {max_documents}"
        )
    for position, document in enumerate(value):
        if not _is_document(document):
            raise _bad_request(
                f'documents[{position}] must be a string, {{"text": string}} '
                f'or {{"image": URL or base64 string}}'
            )
    return value


def _is_document(value: object) -> bool:
    if isinstance(value, str):
        return True
    if not isinstance(value, dict) or len(value) != 1:
        return False
    ((kind, content),) = value.items()
    return isinstance(content, str) and (kind == "text" or (kind == "image" and bool(content)))


def _top_n(value: object) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _bad_request("field 'top_n' must be a positive integer")
    return value


def _return_documents(value: object) -> bool:
    if value is None:
        return True
    if not isinstance(value, bool):
        raise _bad_request("field 'return_documents' must be a boolean")
    return value


def _bearer_token(headers: Headers) -> str | None:
    """The presented secret: None when none was sent (its own error), "" when not a Bearer token."""
    raw = next((value for name, value in headers if name == b"authorization"), b"")
    scheme, _, token = raw.decode("latin-1").strip().partition(" ")
    if not scheme:
        return None
    if scheme.lower() != "bearer":
        return ""
    return token.strip() or None


class _Fault(enum.Enum):
    """Injected faults in the order they are tried; each value names its probability field."""

    RATE_LIMIT = "fault_429"
    SERVER_ERROR = "fault_5xx"
    DROP = "fault_drop"
    SLOW = "fault_slow"


@dataclass(frozen=True)
class _Plan:
    delay_s: float
    fault: _Fault | None


@dataclass
class _Counters:
    calls: int = 0
    ok: int = 0
    status_counts: dict[str, int] = field(default_factory=dict)
    drops: int = 0
    slow: int = 0
    client_closed: int = 0
    tokens_billed: int = 0
    # Documents in answered (200) calls: what a client's cache did not spare.
    documents_scored: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    calls_during_pause: int = 0
    # Calls refused with a 429 because the key's rpm / tpm window was full.
    refused_rpm: int = 0
    refused_tpm: int = 0

    def cleared(self) -> _Counters:
        """Zeroed, but still knowing about requests that are being served right now."""
        return _Counters(in_flight=self.in_flight, max_in_flight=self.in_flight)


class _RateWindow:
    """A key's admitted calls in its sliding window: arrival times and tokens billed."""

    def __init__(self) -> None:
        self._calls: deque[tuple[float, int]] = deque()
        self._tokens = 0

    def admit(
        self, now_s: float, tokens: int, rpm: int | None, tpm: int | None, window_s: float
    ) -> tuple[str, float] | None:
        """Record the call, or refuse it: which limit, and the seconds until it would fit."""
        while self._calls and self._calls[0][0] <= now_s - window_s:
            self._tokens -= self._calls.popleft()[1]
        if rpm is not None and len(self._calls) >= rpm:
            return "rpm", self._calls[len(self._calls) - rpm][0] + window_s - now_s
        # A call bigger than the whole limit is let into an empty window alone.
        excess = self._tokens + tokens - (tpm or 0)
        if tpm is not None and self._tokens > 0 and excess > 0:
            for arrived_s, billed in self._calls:
                excess -= billed
                if excess <= 0:
                    return "tpm", arrived_s + window_s - now_s
        self._calls.append((now_s, tokens))
        self._tokens += tokens
        return None


class _Ledger:
    """Per-key and total counters, plus the 429 pauses later calls are judged against."""

    def __init__(self) -> None:
        self._keys: dict[str, _Counters] = {}
        self._total = _Counters()
        self._pauses: dict[str, tuple[float, float]] = {}
        self.windows: dict[str, _RateWindow] = {}

    def call_started(self, name: str, now_s: float) -> None:
        from_s, until_s = self._pauses.get(name, (math.inf, -math.inf))
        paused = from_s <= now_s < until_s
        for counters in self._both(name):
            counters.calls += 1
            counters.calls_during_pause += paused
            counters.in_flight += 1
            counters.max_in_flight = max(counters.max_in_flight, counters.in_flight)

    def call_finished(self, name: str) -> None:
        for counters in self._both(name):
            counters.in_flight -= 1

    def answered(self, name: str, status: int, tokens: int) -> None:
        for counters in self._both(name):
            counters.status_counts[str(status)] = counters.status_counts.get(str(status), 0) + 1
            if status == 200:
                counters.ok += 1
                counters.tokens_billed += tokens

    def bump(self, name: str, counter: str, by: int = 1) -> None:
        for counters in self._both(name):
            setattr(counters, counter, getattr(counters, counter) + by)

    def pause(self, name: str, from_s: float, until_s: float) -> None:
        """Calls arriving in [from_s, until_s) count as made inside the key's pause."""
        old_from_s, old_until_s = self._pauses.get(name, (from_s, -math.inf))
        if until_s > old_until_s:
            self._pauses[name] = (
                min(from_s, old_from_s) if old_until_s > from_s else from_s,
                until_s,
            )

    def snapshot(self, names: Iterable[str]) -> dict[str, Any]:
        listed = dict.fromkeys([*names, *self._keys])
        keys = {name: asdict(self._keys.get(name, _Counters())) for name in listed}
        return {"keys": keys, "total": asdict(self._total)}

    def reset(self) -> None:
        self._keys = {name: counters.cleared() for name, counters in self._keys.items()}
        self._total = self._total.cleared()
        self._pauses.clear()
        self.windows.clear()

    def _both(self, name: str) -> tuple[_Counters, _Counters]:
        return self._keys.setdefault(name, _Counters()), self._total


class _Connection:
    """One client socket driven through h11, able to notice a client that hangs up mid-request."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._h11 = h11.Connection(h11.SERVER)

    async def read_request(self) -> tuple[h11.Request, bytes] | None:
        """The next request and its whole body; None when the client closed between requests."""
        request = await self._next_event()
        if isinstance(request, h11.ConnectionClosed):
            return None
        body = bytearray()
        while isinstance(event := await self._next_event(), h11.Data):
            body += event.data
            if len(body) > MAX_BODY_BYTES:
                raise _Rejected(_json_response(413, {"detail": "request body is too large"}))
        return request, bytes(body)

    async def send(self, response: _Response) -> None:
        headers = [
            ("content-type", response.content_type),
            ("content-length", str(len(response.body))),
            *response.headers,
        ]
        reason = http.HTTPStatus(response.status).phrase.encode()
        head = h11.Response(status_code=response.status, headers=headers, reason=reason)
        events = (head, h11.Data(data=response.body), h11.EndOfMessage())
        self._writer.write(b"".join(self._h11.send(event) or b"" for event in events))
        await self._writer.drain()

    async def send_if_possible(self, response: _Response) -> None:
        """Best-effort error answer on a connection that is about to be closed anyway."""
        if self._h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            with contextlib.suppress(ConnectionError, h11.LocalProtocolError):
                await self.send(response)

    def start_next_cycle(self) -> bool:
        """Ready the connection for another request; False when it has to close instead."""
        if self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE:
            self._h11.start_next_cycle()
            return True
        return False

    async def client_left_during(self, delay_s: float) -> bool:
        """Wait delay_s while reading the socket, so a client that gives up is seen at once."""
        loop = asyncio.get_running_loop()
        deadline_s = loop.time() + delay_s
        while (remaining_s := deadline_s - loop.time()) > 0:
            read = asyncio.ensure_future(self._read())
            try:
                done, _ = await asyncio.wait({read}, timeout=remaining_s)
            finally:
                await _cancel(read)
            if not done:
                return False
            data = read.result()
            if not data:
                return True
            self._h11.receive_data(data)
        return False

    def abort(self) -> None:
        self._writer.transport.abort()

    def close(self) -> None:
        self._writer.close()

    async def _next_event(self) -> Any:
        while (event := self._h11.next_event()) is h11.NEED_DATA:
            if self._h11.they_are_waiting_for_100_continue:
                continue_event = h11.InformationalResponse(status_code=100, headers=[])
                self._writer.write(self._h11.send(continue_event) or b"")
            self._h11.receive_data(await self._read())
        return event

    async def _read(self) -> bytes:
        try:
            return await self._reader.read(_READ_CHUNK_BYTES)
        except ConnectionError:
            return b""


async def _cancel(task: asyncio.Future[Any]) -> None:
    """Cancel and wait, so the stream reader is free again before anyone reads from it."""
    if task.done():
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


class StandinServer:
    """Answers like `POST https://api.302.ai/jina/v1/rerank`, with faults drawn from a seeded RNG."""

    def __init__(self, config: StandinConfig) -> None:
        self._config = config
        self._names_by_secret = _names_by_secret(config)
        self._rng = random.Random(config.seed)
        self._server_errors = itertools.cycle(_SERVER_ERRORS)
        self._revoked: dict[str, int] = {}
        self._ledger = _Ledger()
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[Any], _Connection] = {}
        self._host = ""
        self._port = 0

    @property
    def config(self) -> StandinConfig:
        return self._config

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("stand-in is not started")
        return self._port

    @property
    def base_url(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._server = await asyncio.start_server(self._serve_connection, host, port)
        self._host = host
        self._port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and abort open connections (not cancel: 3.11 streams log cancelled tasks)."""
        if self._server is None:
            return
        self._server.close()
        for connection in self._connections.values():
            connection.abort()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    def stats(self) -> dict[str, Any]:
        return self._ledger.snapshot(self._config.keys)

    def reset(self) -> None:
        self._ledger.reset()

    def update(self, **fields: Any) -> None:
        """Swap in a validated config; a new seed restarts the fault RNG for reproducible runs."""
        config = self._config.with_changes(**fields)
        self._names_by_secret = _names_by_secret(config)
        self._config = config
        if "seed" in fields:
            self._rng = random.Random(config.seed)

    def revoke(self, name: str, status: int = 401) -> None:
        """From now on the key answers 401 (invalid) or 403 (no balance), like a dead 302.AI key."""
        if name not in self._config.keys:
            raise ValueError("no key with that name")
        if status not in _REVOKED:
            raise ValueError("revoke status must be 401 or 403")
        self._revoked[name] = status

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        connection = _Connection(reader, writer)
        self._connections[task] = connection
        try:
            await self._serve_requests(connection)
        except _Rejected as rejected:
            await connection.send_if_possible(rejected.response)
        except h11.RemoteProtocolError as exc:
            bad = _json_response(exc.error_status_hint, {"detail": "malformed HTTP request"})
            await connection.send_if_possible(bad)
        except ConnectionError:
            pass
        except Exception:
            log.exception("stand-in connection failed")
        finally:
            self._connections.pop(task, None)
            connection.close()

    async def _serve_requests(self, connection: _Connection) -> None:
        while received := await connection.read_request():
            request, body = received
            if not await self._answer(connection, request, body):
                return
            if not connection.start_next_cycle():
                return

    async def _answer(self, connection: _Connection, request: h11.Request, body: bytes) -> bool:
        """Serve one request; False when the connection must not be used again."""
        path = request.target.partition(b"?")[0].decode("latin-1")
        if request.method == b"POST" and path in RERANK_PATHS:
            return await self._rerank(connection, request.headers, body)
        await connection.send(self._admin(request.method, path, body))
        return True

    async def _rerank(self, connection: _Connection, headers: Headers, body: bytes) -> bool:
        try:
            name = self._authenticate(headers)
        except _Rejected as rejected:
            await connection.send(rejected.response)
            return True
        self._ledger.call_started(name, time.monotonic())
        try:
            return await self._rerank_as(connection, name, body)
        finally:
            self._ledger.call_finished(name)

    async def _rerank_as(self, connection: _Connection, name: str, body: bytes) -> bool:
        config = self._config
        try:
            self._check_not_revoked(name)
            request = parse_rerank_request(body, config.max_documents)
        except _Rejected as rejected:
            await self._reply(connection, name, rejected.response)
            return True
        if name in config.rpm or name in config.tpm:
            refusal = self._refusal(name, request, config)
            if refusal is not None:
                await self._reply(connection, name, refusal)
                return True
        plan = self._draw_plan(config)
        if await connection.client_left_during(plan.delay_s):
            return self._client_left(name)
        if plan.fault is _Fault.DROP:
            self._ledger.bump(name, "drops")
            connection.abort()
            return False
        if plan.fault is _Fault.SLOW:
            self._ledger.bump(name, "slow")
            if await connection.client_left_during(config.slow_ms / 1000):
                return self._client_left(name)
        response, tokens = self._outcome(name, request, plan.fault, config)
        await self._reply(connection, name, response, tokens)
        if response.status == 200:
            self._ledger.bump(name, "documents_scored", len(request.documents))
        return True

    def _authenticate(self, headers: Headers) -> str:
        """The key's name; the secret itself goes no further than this lookup."""
        secret = _bearer_token(headers)
        if secret is None:
            raise _Rejected(_MISSING_KEY)
        name = self._names_by_secret.get(secret)
        if name is None:
            raise _Rejected(_INVALID_KEY)
        return name

    def _check_not_revoked(self, name: str) -> None:
        status = self._revoked.get(name)
        if status is not None:
            raise _Rejected(_REVOKED[status])

    def _refusal(
        self, name: str, request: RerankRequest, config: StandinConfig
    ) -> _Response | None:
        """A 429 when the call does not fit the key's window (as a provider counts it)."""
        tokens = _billed_tokens(request, config) if name in config.tpm else 0
        window = self._ledger.windows.setdefault(name, _RateWindow())
        refused = window.admit(
            time.monotonic(), tokens, config.rpm.get(name), config.tpm.get(name), config.window_s
        )
        if refused is None:
            return None
        limit, retry_after_s = refused
        self._ledger.bump(name, f"refused_{limit}")
        detail = {"detail": f"Rate limit exceeded: {limit.upper()} limit of this key reached"}
        if config.rate_limit_retry_after:
            return _rate_limited(max(retry_after_s, 0.001), detail)
        return _json_response(429, detail)

    def _draw_plan(self, config: StandinConfig) -> _Plan:
        """Draw jitter and every fault on arrival, so a seed replays the same run."""
        jitter_ms = (
            self._rng.uniform(0, config.latency_jitter_ms) if config.latency_jitter_ms else 0
        )
        draws = {fault: self._rng.random() for fault in _Fault}
        fault = next((f for f in _Fault if draws[f] < getattr(config, f.value)), None)
        return _Plan(delay_s=(config.latency_ms + jitter_ms) / 1000, fault=fault)

    def _outcome(
        self, name: str, request: RerankRequest, fault: _Fault | None, config: StandinConfig
    ) -> tuple[_Response, int]:
        if fault is _Fault.RATE_LIMIT:
            now_s = time.monotonic()
            self._ledger.pause(
                name, now_s + config.pause_grace_ms / 1000, now_s + config.retry_after_s
            )
            return _rate_limited(config.retry_after_s), 0
        if fault is _Fault.SERVER_ERROR:
            return next(self._server_errors), 0
        results, tokens = rank(
            request.query,
            request.documents,
            request.top_n,
            request.return_documents,
            config.image_tokens,
        )
        if config.token_factor != 1:
            tokens = round(tokens * config.token_factor)
        shape = usage_shapes.shape_of(request.model, config.usage_shapes)
        payload = {
            "model": request.model,
            "object": "list",
            **usage_shapes.usage_fields(shape, tokens, len(request.documents)),
            "results": results,
        }
        return _json_response(200, payload), tokens

    async def _reply(
        self, connection: _Connection, name: str, response: _Response, tokens: int = 0
    ) -> None:
        await connection.send(response)
        self._ledger.answered(name, response.status, tokens)

    def _client_left(self, name: str) -> bool:
        self._ledger.bump(name, "client_closed")
        return False

    def _admin(self, method: bytes, path: str, body: bytes) -> _Response:
        try:
            return self._admin_action(method, path, body)
        except _Rejected as rejected:
            return rejected.response
        except ValueError as exc:
            return _json_response(400, {"detail": str(exc)})

    def _admin_action(self, method: bytes, path: str, body: bytes) -> _Response:
        route = (method, path)
        if route == (b"GET", "/_standin/stats"):
            return _json_response(200, self.stats())
        if route == (b"POST", "/_standin/reset"):
            self.reset()
            return _json_response(200, {"reset": True})
        if route == (b"POST", "/_standin/config"):
            fields = _json_object(body)
            self.update(**fields)
            return _json_response(200, {"updated": sorted(fields)})
        if route == (b"POST", "/_standin/revoke"):
            payload = _json_object(body)
            name, status = payload.get("name"), payload.get("status", 401)
            if not isinstance(name, str) or not isinstance(status, int):
                raise ValueError('expected {"name": string, "status": 401 or 403}')
            self.revoke(name, status)
            return _json_response(200, {"revoked": name, "status": status})
        return _NOT_FOUND


def _names_by_secret(config: StandinConfig) -> dict[str, str]:
    return {secret: name for name, secret in config.keys.items()}


class ThreadedStandin:
    """A stand-in on its own thread and event loop, driven from synchronous code such as tests."""

    def __init__(
        self,
        server: StandinServer,
        loop: asyncio.AbstractEventLoop,
        stop: asyncio.Event,
        thread: threading.Thread,
    ) -> None:
        self._server = server
        self._loop = loop
        self._stop = stop
        self._thread = thread

    @property
    def base_url(self) -> str:
        return self._server.base_url

    @property
    def port(self) -> int:
        return self._server.port

    def stats(self) -> dict[str, Any]:
        return self._on_loop(self._server.stats)

    def reset(self) -> None:
        self._on_loop(self._server.reset)

    def update(self, **fields: Any) -> None:
        self._on_loop(lambda: self._server.update(**fields))

    def revoke(self, name: str, status: int = 401) -> None:
        self._on_loop(lambda: self._server.revoke(name, status))

    def close(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(_THREAD_CALL_TIMEOUT_S)

    def __enter__(self) -> ThreadedStandin:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _on_loop(self, call: Callable[[], _T]) -> _T:
        """Run on the server's loop so state is only ever touched from one thread."""

        async def run() -> _T:
            return call()

        future = asyncio.run_coroutine_threadsafe(run(), self._loop)
        return future.result(_THREAD_CALL_TIMEOUT_S)


def run_in_thread(config: StandinConfig, host: str = "127.0.0.1", port: int = 0) -> ThreadedStandin:
    """Start a stand-in on a daemon thread; returns once it accepts connections."""
    server = StandinServer(config)
    started: concurrent.futures.Future[tuple[asyncio.AbstractEventLoop, asyncio.Event]]
    started = concurrent.futures.Future()
    thread = threading.Thread(
        target=asyncio.run,
        args=(_serve_until_stopped(server, host, port, started),),
        name="standin",
        daemon=True,
    )
    thread.start()
    loop, stop = started.result(_THREAD_CALL_TIMEOUT_S)
    return ThreadedStandin(server, loop, stop, thread)


async def _serve_until_stopped(
    server: StandinServer,
    host: str,
    port: int,
    started: concurrent.futures.Future[tuple[asyncio.AbstractEventLoop, asyncio.Event]],
) -> None:
    try:
        await server.start(host, port)
    except Exception as exc:
        started.set_exception(exc)
        return
    stop = asyncio.Event()
    started.set_result((asyncio.get_running_loop(), stop))
    await stop.wait()
    await server.stop()
