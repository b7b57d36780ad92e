"""Python clients of rerank-worker's HTTP API, named as httpx names its own: `Client` and
`AsyncClient`. (The upstream's client, worker/upstream/client.py, is `RerankClient`.)

    from worker.client import Client

    with Client("http://127.0.0.1:8080", token="rrw_...") as client:
        job = client.submit("requests.jsonl")       # a path, an iterable of dicts, a binary file
        job = client.wait(job.id)                   # long-polls until the job ends
        for line in client.results(job.id):         # streamed, in input order
            print(line.custom_id, [r.index for r in line.results])
        ranking = client.rerank("boots", ["trail runner", "leather boot"], top_n=1)

A body is streamed to `POST /v1/jobs` from a generator, never read whole, and results are
read line by line, so neither side's size sets the memory. Errors of the API raise:

    APIError                status, type, message, line, field, body
    ├── InvalidRequest      400: bad input (line and field say where)
    ├── Unauthorized        401: no token, or one that is not valid
    ├── NotFound            404: no such job, or not the caller's
    ├── RateLimited         429
    └── ServerError         5xx: the rerank failed upstream (502, 503), timed out (504), ...
    APIConnectionError      the API could not be reached (an httpx.TransportError inside)
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, TypeVar

import anyio.to_thread
import httpx

DEFAULT_TIMEOUT = httpx.Timeout(180.0, connect=10.0)
# `wait` holds each long poll this long (the API may cap it), and allows it this much more.
WAIT_POLL_S = 30.0
WAIT_MARGIN_S = 15.0
UPLOAD_CHUNK_BYTES = 256 * 1024
ENDED = frozenset({"completed", "cancelled", "failed"})
NDJSON = "application/x-ndjson"

# What `submit` streams: a path, an iterable of requests (or corpus documents), or a binary
# file object open for reading. AsyncClient also takes an async iterable.
Source = str | os.PathLike[str] | IO[bytes] | Iterable[Any]
AsyncSource = Source | AsyncIterable[Any]
Self = TypeVar("Self")


class APIError(Exception):
    """An answer of the API that is not a success; `type` is its error type."""

    def __init__(
        self,
        status: int | None,
        type: str,
        message: str,
        *,
        line: int | None = None,
        field: str | None = None,
        body: Any = None,
    ) -> None:
        where = ", ".join(
            part
            for part in (
                f"line {line}" if line is not None else "",
                f"field '{field}'" if field else "",
            )
            if part
        )
        super().__init__(f"{status} {type}: {message}" + (f" ({where})" if where else ""))
        self.status = status
        self.type = type
        self.message = message
        self.line = line
        self.field = field
        self.body = body


class InvalidRequest(APIError):
    pass


class Unauthorized(APIError):
    pass


class NotFound(APIError):
    pass


class RateLimited(APIError):
    pass


class ServerError(APIError):
    pass


class APIConnectionError(APIError):
    def __init__(self, message: str) -> None:
        super().__init__(None, "connection_error", message)


_BY_STATUS: dict[int, type[APIError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    404: NotFound,
    429: RateLimited,
}


def _raise_for(response: httpx.Response) -> None:
    """Raise the APIError of a non-success answer (its body must have been read)."""
    if response.is_success:
        return
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        error = {"type": "http_error", "message": str(body)[:500] or response.reason_phrase}
    status = response.status_code
    kind = _BY_STATUS.get(status, ServerError if status >= 500 else APIError)
    raise kind(
        status,
        str(error.get("type", "http_error")),
        str(error.get("message", "")),
        line=error.get("line"),
        field=error.get("field"),
        body=body,
    )


@dataclass(frozen=True)
class Job:
    """The job object (`rerank-worker status JOB --json`); `data` holds every field."""

    id: str
    status: str
    priority: str | None
    total_requests: int
    total: int
    succeeded: int
    failed: int
    pending: int
    usage: dict[str, Any]
    data: dict[str, Any] = field(repr=False)

    @property
    def ended(self) -> bool:
        return self.status in ENDED

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Job:
        return cls(
            id=data["id"],
            status=data["status"],
            priority=data.get("priority"),
            total_requests=int(data.get("total_requests") or 0),
            total=int(data.get("total") or 0),
            succeeded=int(data.get("succeeded") or 0),
            failed=int(data.get("failed") or 0),
            pending=int(data.get("pending") or 0),
            usage=dict(data.get("usage") or {}),
            data=data,
        )


@dataclass(frozen=True)
class RankedDocument:
    """One entry of a ranking: `index` points into the request's documents as submitted."""

    index: int
    relevance_score: float
    document: Any = None
    id: str | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RankedDocument:
        return cls(
            index=int(data["index"]),
            relevance_score=float(data["relevance_score"]),
            document=data.get("document"),
            id=data.get("id"),
        )


@dataclass(frozen=True)
class LineError:
    type: str
    message: str


@dataclass(frozen=True)
class ResultLine:
    """One line of a job's results, for one request, in input order."""

    custom_id: str
    status: str
    results: list[RankedDocument]
    total_tokens: int
    error: LineError | None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ResultLine:
        error = data.get("error")
        return cls(
            custom_id=data["custom_id"],
            status=data["status"],
            results=[RankedDocument.from_json(r) for r in data.get("results") or []],
            total_tokens=int((data.get("usage") or {}).get("total_tokens") or 0),
            error=LineError(str(error["type"]), str(error["message"])) if error else None,
        )


@dataclass(frozen=True)
class Usage:
    """`usage --json` of the caller's jobs (or of one); `data` holds the per key breakdown."""

    total_tokens: int
    calls: int
    billed_calls: int
    cost: float
    data: dict[str, Any] = field(repr=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Usage:
        return cls(
            total_tokens=int(data.get("total_tokens") or 0),
            calls=int(data.get("calls") or 0),
            billed_calls=int(data.get("billed_calls") or 0),
            cost=float(data.get("cost") or 0.0),
            data=data,
        )


@dataclass(frozen=True)
class Ranking:
    """A synchronous rerank's answer (Jina's shape): results best first."""

    model: str
    results: list[RankedDocument]
    total_tokens: int

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Ranking:
        return cls(
            model=str(data.get("model", "")),
            results=[RankedDocument.from_json(r) for r in data.get("results") or []],
            total_tokens=int((data.get("usage") or {}).get("total_tokens") or 0),
        )


def _submit_params(**options: Any) -> dict[str, Any]:
    """Query parameters of POST /v1/jobs, as the CLI's options; None means not given."""
    params: dict[str, Any] = {}
    for name, value in options.items():
        if value is None:
            continue
        params[name] = ("true" if value else "false") if isinstance(value, bool) else value
    return params


def _submit_headers(idempotency_key: str | None) -> dict[str, str]:
    headers = {"Content-Type": NDJSON}
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    return headers


def _json_line(item: Any) -> bytes:
    return json.dumps(item, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def _batched(lines: Iterable[bytes]) -> Iterator[bytes]:
    """Lines gathered into chunks of about UPLOAD_CHUNK_BYTES (fewer, larger writes)."""
    chunk: list[bytes] = []
    size = 0
    for line in lines:
        chunk.append(line)
        size += len(line)
        if size >= UPLOAD_CHUNK_BYTES:
            yield b"".join(chunk)
            chunk, size = [], 0
    if chunk:
        yield b"".join(chunk)


def _file_chunks(file: IO[bytes]) -> Iterator[bytes]:
    while chunk := file.read(UPLOAD_CHUNK_BYTES):
        if isinstance(chunk, str):
            raise TypeError("submit takes a file opened in binary mode ('rb')")
        yield chunk


def _path_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as file:
        yield from _file_chunks(file)


def _body(source: Source) -> Iterator[bytes]:
    """The source as a stream of bytes: read as it is sent, never whole."""
    if isinstance(source, str | os.PathLike):
        return _path_chunks(Path(source))
    if hasattr(source, "read"):
        return _file_chunks(source)  # type: ignore[arg-type]
    if isinstance(source, bytes | bytearray | Mapping):
        raise TypeError("submit takes a path, an iterable of requests or a binary file object")
    return _batched(_json_line(item) for item in source)


def _rerank_body(
    query: str,
    documents: list[Any],
    model: str | None,
    top_n: int | None,
    return_documents: bool,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "query": query,
        "documents": documents,
        "return_documents": return_documents,
    }
    if model is not None:
        body["model"] = model
    if top_n is not None:
        body["top_n"] = top_n
    return body


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _wait_s(deadline: float | None) -> float:
    if deadline is None:
        return WAIT_POLL_S
    return max(0.0, min(WAIT_POLL_S, deadline - time.monotonic()))


class Client:
    """A synchronous client; one connection pool, closed by `close()` or `with`."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers=_auth(token),
            timeout=timeout,
            transport=transport,
        )

    def __enter__(self: Self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise APIConnectionError(f"{type(exc).__name__}: {exc}") from exc
        _raise_for(response)
        return response.json()

    def submit(
        self,
        source: Source,
        *,
        query: str | None = None,
        model: str | None = None,
        top_n: int | None = None,
        priority: str | None = None,
        cache: bool | None = None,
        max_tokens: int | None = None,
        max_cost: float | None = None,
        webhook_url: str | None = None,
        on_complete: str | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        """Stream a requests file (or a corpus, with `query`) to the API; the stored job."""
        params = _submit_params(
            query=query,
            model=model,
            top_n=top_n,
            priority=priority,
            cache=cache,
            max_tokens=max_tokens,
            max_cost=max_cost,
            webhook_url=webhook_url,
            on_complete=on_complete,
        )
        data = self._send(
            "POST",
            "/v1/jobs",
            params=params,
            headers=_submit_headers(idempotency_key),
            content=_body(source),
        )
        return Job.from_json(data)

    def get(self, job_id: str, *, wait: float | None = None) -> Job:
        """The job; with `wait`, the API holds the answer up to that many seconds until it ends."""
        params = {"wait": wait} if wait else None
        timeout = self._http.timeout.read if not wait else wait + WAIT_MARGIN_S
        return Job.from_json(
            self._send("GET", f"/v1/jobs/{job_id}", params=params, timeout=timeout)
        )

    def wait(self, job_id: str, *, timeout: float | None = None) -> Job:
        """Long-poll until the job ends; TimeoutError when `timeout` seconds pass first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get(job_id, wait=_wait_s(deadline))
            if job.ended:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} is still {job.status} after {timeout} s")

    def jobs(self, *, status: str | None = None, limit: int | None = None) -> list[Job]:
        params = _submit_params(status=status, limit=limit)
        data = self._send("GET", "/v1/jobs", params=params)
        return [Job.from_json(job) for job in data["data"]]

    def results(self, job_id: str) -> Iterator[ResultLine]:
        """The job's result lines in input order, read from the stream as they come."""
        try:
            with self._http.stream("GET", f"/v1/jobs/{job_id}/results") as response:
                if not response.is_success:
                    response.read()
                    _raise_for(response)
                for line in response.iter_lines():
                    if line:
                        yield ResultLine.from_json(json.loads(line))
        except httpx.TransportError as exc:
            raise APIConnectionError(f"{type(exc).__name__}: {exc}") from exc

    def cancel(self, job_id: str) -> Job:
        return Job.from_json(self._send("POST", f"/v1/jobs/{job_id}/cancel"))

    def retry(
        self, job_id: str, *, max_tokens: int | None = None, max_cost: float | None = None
    ) -> Job:
        params = _submit_params(max_tokens=max_tokens, max_cost=max_cost)
        return Job.from_json(self._send("POST", f"/v1/jobs/{job_id}/retry", params=params))

    def usage(self, job_id: str | None = None) -> Usage:
        params = {"job": job_id} if job_id else None
        return Usage.from_json(self._send("GET", "/v1/usage", params=params))

    def rerank(
        self,
        query: str,
        documents: list[Any],
        *,
        model: str | None = None,
        top_n: int | None = None,
        return_documents: bool = False,
    ) -> Ranking:
        """One synchronous rerank (POST /v1/rerank), through the workers like any job."""
        body = _rerank_body(query, documents, model, top_n, return_documents)
        return Ranking.from_json(self._send("POST", "/v1/rerank", json=body))


async def _async_body(source: AsyncSource) -> AsyncIterator[bytes]:
    """As `_body`; file reads run in a worker thread, so the event loop never waits on disk."""
    if isinstance(source, AsyncIterable):
        async for item in source:
            yield _json_line(item)
        return
    chunks = _body(source)
    if isinstance(source, str | os.PathLike) or hasattr(source, "read"):
        while (chunk := await anyio.to_thread.run_sync(next, chunks, None)) is not None:
            yield chunk
        return
    for chunk in chunks:
        yield chunk


class AsyncClient:
    """The asyncio client: the same methods as `Client`, awaited; `results` is async."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers=_auth(token),
            timeout=timeout,
            transport=transport,
        )

    async def __aenter__(self: Self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise APIConnectionError(f"{type(exc).__name__}: {exc}") from exc
        _raise_for(response)
        return response.json()

    async def submit(
        self,
        source: AsyncSource,
        *,
        query: str | None = None,
        model: str | None = None,
        top_n: int | None = None,
        priority: str | None = None,
        cache: bool | None = None,
        max_tokens: int | None = None,
        max_cost: float | None = None,
        webhook_url: str | None = None,
        on_complete: str | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        params = _submit_params(
            query=query,
            model=model,
            top_n=top_n,
            priority=priority,
            cache=cache,
            max_tokens=max_tokens,
            max_cost=max_cost,
            webhook_url=webhook_url,
            on_complete=on_complete,
        )
        data = await self._send(
            "POST",
            "/v1/jobs",
            params=params,
            headers=_submit_headers(idempotency_key),
            content=_async_body(source),
        )
        return Job.from_json(data)

    async def get(self, job_id: str, *, wait: float | None = None) -> Job:
        params = {"wait": wait} if wait else None
        timeout = self._http.timeout.read if not wait else wait + WAIT_MARGIN_S
        data = await self._send("GET", f"/v1/jobs/{job_id}", params=params, timeout=timeout)
        return Job.from_json(data)

    async def wait(self, job_id: str, *, timeout: float | None = None) -> Job:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = await self.get(job_id, wait=_wait_s(deadline))
            if job.ended:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} is still {job.status} after {timeout} s")

    async def jobs(self, *, status: str | None = None, limit: int | None = None) -> list[Job]:
        data = await self._send(
            "GET", "/v1/jobs", params=_submit_params(status=status, limit=limit)
        )
        return [Job.from_json(job) for job in data["data"]]

    async def results(self, job_id: str) -> AsyncIterator[ResultLine]:
        try:
            async with self._http.stream("GET", f"/v1/jobs/{job_id}/results") as response:
                if not response.is_success:
                    await response.aread()
                    _raise_for(response)
                async for line in response.aiter_lines():
                    if line:
                        yield ResultLine.from_json(json.loads(line))
        except httpx.TransportError as exc:
            raise APIConnectionError(f"{type(exc).__name__}: {exc}") from exc

    async def cancel(self, job_id: str) -> Job:
        return Job.from_json(await self._send("POST", f"/v1/jobs/{job_id}/cancel"))

    async def retry(
        self, job_id: str, *, max_tokens: int | None = None, max_cost: float | None = None
    ) -> Job:
        params = _submit_params(max_tokens=max_tokens, max_cost=max_cost)
        return Job.from_json(await self._send("POST", f"/v1/jobs/{job_id}/retry", params=params))

    async def usage(self, job_id: str | None = None) -> Usage:
        params = {"job": job_id} if job_id else None
        return Usage.from_json(await self._send("GET", "/v1/usage", params=params))

    async def rerank(
        self,
        query: str,
        documents: list[Any],
        *,
        model: str | None = None,
        top_n: int | None = None,
        return_documents: bool = False,
    ) -> Ranking:
        body = _rerank_body(query, documents, model, top_n, return_documents)
        return Ranking.from_json(await self._send("POST", "/v1/rerank", json=body))
