"""One upstream rerank call over httpx, with every failure mapped to the project's errors.

httpx and status-code details stop here: callers see `CallResult` or an `UpstreamError`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any, NamedTuple

import httpx

from worker import errors
from worker.settings import ApiKey
from worker.upstream import retry
from worker.upstream.network import UpstreamTransport

# 302.AI's error codes (CONTRACT.md): retried, key taken out of use, or request failed.
RETRIED_CODES = frozenset({-10003, -10008, -1024})
KEY_UNUSABLE_CODES = frozenset({-10004, -10005, -10006, -10007, -10018})
REJECTED_CODES = frozenset({-10001, -10011})
DAILY_QUOTA_CODE = -10007
# A key refused for balance, credentials or quota is tried again after this long.
KEY_UNUSABLE_S = 3600.0
MAX_MESSAGE_CHARS = 500
USER_AGENT = f"rerank-worker/{version('rerank-worker')} httpx/{httpx.__version__}"


@dataclass(frozen=True)
class CallResult:
    results: list[dict[str, Any]]
    total_tokens: int
    latency_ms: float
    status_code: int = 200
    search_units: int = 0
    # False when the answer carried no usage figure at all: its 0 tokens are not a count.
    usage_known: bool = True


class Usage(NamedTuple):
    tokens: int
    search_units: int
    known: bool


UNKNOWN_USAGE = Usage(0, 0, False)


def _count(value: Any) -> int | None:
    """A count, None when absent; a count that is not a number makes the answer malformed."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError("a usage count is not a number")
    return int(value)


def _tokens_of(counts: Any) -> int | None:
    """total_tokens, else input_tokens + output_tokens, of a dict of counts (None: absent)."""
    if counts is None:
        return None
    if not isinstance(counts, dict):
        raise TypeError("a usage figure is not an object")
    total = _count(counts.get("total_tokens"))
    if total is not None:
        return total
    parts = [_count(counts.get(name)) for name in ("input_tokens", "output_tokens")]
    if all(part is None for part in parts):
        return None
    return sum(part or 0 for part in parts)


def parse_usage(body: dict[str, Any]) -> Usage:
    """What a success answer says it billed, in every shape 302.AI's rerank models use:
    Jina's `usage.total_tokens`, Cohere's `meta.billed_units` (tokens or `search_units`),
    `meta.tokens` and `tokens` (input/output tokens); or nothing, which is not 0 tokens."""
    meta = body.get("meta")
    meta = meta if isinstance(meta, dict) else {}
    billed = meta.get("billed_units")
    search_units = _count(billed.get("search_units")) if isinstance(billed, dict) else None
    for counts in (body.get("usage"), billed, meta.get("tokens"), body.get("tokens")):
        tokens = _tokens_of(counts)
        if tokens is not None:
            return Usage(tokens, search_units or 0, True)
    if search_units is not None:
        return Usage(0, search_units, True)
    return UNKNOWN_USAGE


def build_body(
    *,
    model: str,
    query: str,
    documents_json: Sequence[str],
    top_n: int | None,
    return_documents: bool,
) -> bytes:
    """The JSON body, with the stored documents spliced in as they are (no re-encoding)."""
    head = json.dumps({"model": model, "query": query}, ensure_ascii=False)[:-1]
    tail = {"return_documents": return_documents}
    if top_n is not None:
        tail["top_n"] = top_n  # type: ignore[assignment]
    return f'{head},"documents":[{",".join(documents_json)}],{json.dumps(tail)[1:]}'.encode()


def _error_code_and_message(response: httpx.Response) -> tuple[int | None, str]:
    """Read every body shape: Jina's {"detail"}, 302.AI's {"error": {...}}, text or HTML."""
    text = response.text
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            code = error.get("err_code")
            message = error.get("message") or json.dumps(error, ensure_ascii=False)
            return (code if isinstance(code, int) else None), str(message)
        if isinstance(error, str):
            return None, error
        detail = body.get("detail")
        if detail is not None:
            return None, detail if isinstance(detail, str) else json.dumps(detail)
        message = body.get("message")
        if isinstance(message, str):
            return None, message
    stripped = " ".join(text.split())
    return None, stripped or f"HTTP {response.status_code}"


def _seconds_to_next_utc_day() -> float:
    now = dt.datetime.now(dt.UTC)
    tomorrow = (now + dt.timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return (tomorrow - now).total_seconds()


def classify(response: httpx.Response, key: ApiKey) -> errors.UpstreamError:
    """Map a non-200 answer to the error that says what to do next."""
    status = response.status_code
    code, message = _error_code_and_message(response)
    message = scrub(message, key)[:MAX_MESSAGE_CHARS]
    retry_after_s = retry.parse_retry_after(response.headers)
    context: dict[str, Any] = {"key_name": key.name, "status_code": status}
    summary = f"HTTP {status} from upstream on key '{key.name}': {message}"
    if code in RETRIED_CODES:
        return errors.RetryableError(summary, retry_after_s=retry_after_s, **context)
    if code in REJECTED_CODES:
        return errors.RequestRejected(summary, **context)
    if code in KEY_UNUSABLE_CODES:
        until = _seconds_to_next_utc_day() if code == DAILY_QUOTA_CODE else KEY_UNUSABLE_S
        return errors.KeyUnusable(summary, until_s=until, **context)
    if status == 429:
        return errors.RateLimited(summary, retry_after_s=retry_after_s, **context)
    if status in (401, 403):
        return errors.KeyUnusable(summary, until_s=KEY_UNUSABLE_S, **context)
    if status == 408 or status >= 500:
        return errors.RetryableError(summary, retry_after_s=retry_after_s, **context)
    return errors.RequestRejected(summary, **context)


def scrub(text: str, key: ApiKey) -> str:
    """Remove a secret that an upstream or proxy might echo back."""
    secret = key.secret.get_secret_value()
    return text.replace(secret, "***") if secret else text


def _parse_success(response: httpx.Response, key: ApiKey, latency_ms: float) -> CallResult:
    try:
        body = response.json()
        results = body["results"]
        usage = parse_usage(body)
        if not isinstance(results, list):
            raise TypeError("results is not a list")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        # The exception's text may quote the body: name only its kind.
        raise errors.RetryableError(
            f"malformed 200 answer on key '{key.name}' ({type(exc).__name__})",
            key_name=key.name,
            status_code=200,
        ) from exc
    return CallResult(
        results=results,
        total_tokens=usage.tokens,
        latency_ms=latency_ms,
        search_units=usage.search_units,
        usage_known=usage.known,
    )


class RerankClient:
    """One per process: a pooled httpx transport per key, reused for every call.

    A pool per key, sized to that key's slots, rather than one shared pool: a key's calls
    never wait for a connection another key holds, and a key never opens more connections
    than it may have calls in flight.

    Calls go straight to the transport (httpx's `handle_async_request`). The AsyncClient
    layer above it (cookies, auth flows, redirects, event hooks) does nothing for one POST
    with fixed headers, and cost a quarter of httpx's CPU per call. The transport is
    `UpstreamTransport`: keep-alive connections on asyncio's own transports, responses
    parsed by httptools (see `worker.upstream.network`).
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float,
        keys: Sequence[ApiKey] = (),
        spare_connections: int = 2,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.timeout_s = timeout_s
        self._base_url = base_url.rstrip("/")
        self._timeouts = httpx.Timeout(timeout_s).as_dict()
        self._spare_connections = spare_connections
        self._shared_transport = transport
        self._urls: dict[str, httpx.URL] = {}
        self._pools: dict[str, tuple[httpx.AsyncBaseTransport, list[tuple[str, str]]]] = {}
        for key in keys:  # made now: a transport's TLS context takes milliseconds to build
            self._pool(key)

    def _pool(self, key: ApiKey) -> tuple[httpx.AsyncBaseTransport, list[tuple[str, str]]]:
        """The key's transport and the headers of its calls."""
        pool = self._pools.get(key.name)
        if pool is None:
            size = key.max_concurrency + self._spare_connections
            transport = self._shared_transport or UpstreamTransport(max_connections=size)
            headers = [
                ("accept", "application/json"),
                ("content-type", "application/json"),
                ("user-agent", USER_AGENT),
                ("authorization", f"Bearer {key.secret.get_secret_value()}"),
            ]
            pool = self._pools[key.name] = (transport, headers)
        return pool

    def _url(self, path: str) -> httpx.URL:
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = httpx.URL(self._base_url + path)
        return url

    async def aclose(self) -> None:
        for transport in {id(t): t for t, _ in self._pools.values()}.values():
            await transport.aclose()
        self._pools.clear()

    async def rerank(self, key: ApiKey, path: str, body: bytes) -> CallResult:
        """One attempt. The whole call, slow bodies included, ends within `timeout_s`."""
        transport, headers = self._pool(key)
        request = httpx.Request(
            "POST", self._url(path), headers=headers, content=body,
            extensions={"timeout": self._timeouts},
        )  # fmt: skip
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout_s):
                response = await transport.handle_async_request(request)
                try:
                    await response.aread()
                except BaseException:
                    await response.aclose()
                    raise
        except (TimeoutError, httpx.TimeoutException) as exc:
            raise errors.UpstreamTimeout(
                f"upstream timed out after {self.timeout_s:g}s on key '{key.name}'",
                key_name=key.name,
            ) from exc
        except httpx.TransportError as exc:
            raise errors.ConnectionFailed(
                f"upstream connection failed on key '{key.name}': {type(exc).__name__}",
                key_name=key.name,
            ) from exc
        except httpx.RequestError as exc:  # an answer that could not be read (decoding)
            raise errors.RetryableError(
                f"upstream answer unreadable on key '{key.name}': {type(exc).__name__}",
                key_name=key.name,
            ) from exc
        latency_ms = (time.perf_counter() - started) * 1000
        if response.status_code == 200:
            return _parse_success(response, key, latency_ms)
        raise classify(response, key)
