"""The body of `POST /v1/jobs` into `submit_job`, streamed: the CLI's one code path.

`submit_job` is synchronous and reads an iterable of lines; it runs in a worker thread, which
pulls the body's chunks from the event loop through a small bounded buffer, so the API holds a
few chunks and one line at a time whatever the body's size.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
from starlette.requests import ClientDisconnect

from worker import errors
from worker.service.submit import JobOptions, SubmitResult, submit_job
from worker.settings import Settings

log = logging.getLogger(__name__)

# Chunks read ahead of the parser: the socket keeps being read while a chunk is parsed.
BUFFERED_CHUNKS = 16
# A line longer than this is refused before it is held whole.
MAX_LINE_BYTES = 64 * 1024 * 1024
# An application/json body is parsed whole, so it has a smaller cap than a streamed one.
MAX_JSON_BODY_BYTES = 16 * 1024 * 1024


def split_lines(chunks: Iterable[bytes], max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[bytes]:
    """The lines of a body that arrives in chunks of any size (split on b"\\n", as a file's
    lines are), without joining a long line's pieces more than once."""
    pending: list[bytes] = []
    pending_bytes = 0
    line_no = 0
    for chunk in chunks:
        parts = chunk.split(b"\n")
        tail = parts.pop()
        if parts:
            if pending:
                pending.append(parts[0])
                parts[0] = b"".join(pending)
                pending.clear()
                pending_bytes = 0
            line_no += len(parts)
            yield from parts
        if tail:
            pending.append(tail)
            pending_bytes += len(tail)
            if pending_bytes > max_line_bytes:
                raise errors.InputError(
                    f"line longer than the cap of {max_line_bytes} bytes", line=line_no + 1
                )
    if pending:
        yield b"".join(pending)


class _BodyPipe:
    """The body's chunks from the event loop (the pump) to the parser in its thread."""

    def __init__(self) -> None:
        self.send, self.receive = anyio.create_memory_object_stream[bytes](BUFFERED_CHUNKS)
        self.complete = False

    def chunks(self) -> Iterator[bytes]:
        """In the worker thread. A body cut short (the client went away) is an error, so
        a truncated file is never stored as if it were whole."""
        while True:
            try:
                yield anyio.from_thread.run(self.receive.receive)
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                if not self.complete:
                    log.warning("action=upload_incomplete reason=body_cut_short")
                    raise errors.InputError("the body ended before it was complete") from None
                return

    async def pump(self, body: AsyncIterator[bytes]) -> None:
        """Feed the body to the parser; once the parser stopped (bad input, a known job),
        read the rest and drop it, so a client that is still sending gets its answer. A
        client that goes away leaves the body incomplete, which the parser then refuses."""
        with contextlib.suppress(ClientDisconnect):
            with self.send:
                async for chunk in body:
                    if not chunk:
                        continue
                    try:
                        await self.send.send(chunk)
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                        break
                else:
                    self.complete = True
                    return
            async for _ in body:
                pass


async def submit_stream(
    body: AsyncIterator[bytes],
    *,
    options: JobOptions,
    tenant_id: int | None,
    settings: Settings,
    source: str,
) -> SubmitResult:
    """Submit a JSON Lines body (a requests or a corpus file) as it arrives."""
    pipe = _BodyPipe()
    run = functools.partial(
        submit_job, source=source, options=options, tenant_id=tenant_id, settings=settings
    )
    failure: Exception | None = None
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(pipe.pump, body)
        with pipe.receive:
            try:
                result = await anyio.to_thread.run_sync(lambda: run(split_lines(pipe.chunks())))
            except Exception as exc:  # answered once the pump has read the rest of the body
                failure = exc
    if failure is not None:
        raise failure
    return result


async def read_json_lines(body: AsyncIterator[bytes], query_given: bool) -> list[bytes]:
    """An application/json body, `{"requests": [...]}` (or `{"documents": [...]}` with a
    query), as the JSON lines of the equivalent file; line N is the list's N-th item."""
    data = bytearray()
    async for chunk in body:
        data += chunk
        if len(data) > MAX_JSON_BODY_BYTES:
            raise errors.InputError(
                f"an application/json body is capped at {MAX_JSON_BODY_BYTES} bytes; "
                "send larger jobs as application/x-ndjson, which streams"
            )
    try:
        parsed: Any = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise errors.InputError(f"the body is not valid JSON ({exc})") from exc
    member = "documents" if query_given else "requests"
    items = parsed.get(member) if isinstance(parsed, dict) else None
    if not isinstance(items, list):
        raise errors.InputError(f'expected an object {{"{member}": [...]}}', field=member)
    return [json.dumps(item, ensure_ascii=False).encode() for item in items]


async def submit_json(
    body: AsyncIterator[bytes],
    *,
    options: JobOptions,
    tenant_id: int | None,
    settings: Settings,
    source: str,
) -> SubmitResult:
    lines = await read_json_lines(body, options.query is not None)
    return await anyio.to_thread.run_sync(
        functools.partial(
            submit_job,
            lines,
            source=source,
            options=options,
            tenant_id=tenant_id,
            settings=settings,
        )
    )
