"""worker.client without a socket: what it sends (a streamed body, the parameters) and how it
reads answers and errors, through httpx.MockTransport. The same clients against the real API
are exercised in tests/api/test_clients.py."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from worker import client as api_client
from worker.client import AsyncClient, Client

JOB = {"id": "j1", "status": "queued", "priority": "bulk", "total_requests": 2, "total": 2}


class Recording(httpx.BaseTransport):
    """Keeps each request, its body and how many chunks the body came in (MockTransport
    would read the body whole before its handler sees it)."""

    def __init__(self, answer: Callable[[httpx.Request], httpx.Response]) -> None:
        self.answer = answer
        self.seen: list[tuple[httpx.Request, bytes, int]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        chunks = list(request.stream)  # type: ignore[arg-type]
        self.seen.append((request, b"".join(chunks), len(chunks)))
        return self.answer(request)


def recording(
    answer: Callable[[httpx.Request], httpx.Response],
) -> tuple[Recording, list[tuple[httpx.Request, bytes, int]]]:
    transport = Recording(answer)
    return transport, transport.seen


def created(_: httpx.Request) -> httpx.Response:
    return httpx.Response(201, json=JOB)


def test_submit_streams_an_iterable_of_dicts_as_ndjson_with_the_options() -> None:
    transport, seen = recording(created)
    rows = [{"custom_id": f"r{i}", "query": "q", "documents": ["d é"]} for i in range(3)]
    with Client("http://api.test/", "rrw_token", transport=transport) as client:
        job = client.submit(iter(rows), model="m", top_n=2, cache=False, idempotency_key="k-1")
    assert job.id == "j1" and job.status == "queued" and not job.ended
    request, body, _ = seen[0]
    assert request.method == "POST" and request.url.path == "/v1/jobs"
    assert dict(request.url.params) == {"model": "m", "top_n": "2", "cache": "false"}
    assert request.headers["content-type"] == "application/x-ndjson"
    assert request.headers["idempotency-key"] == "k-1"
    assert request.headers["authorization"] == "Bearer rrw_token"
    # A generator body goes out chunked: no Content-Length, nothing read whole first.
    assert "content-length" not in request.headers
    assert [json.loads(line) for line in body.splitlines()] == rows


def test_submit_reads_a_path_and_a_file_object_in_chunks(tmp_path: Path) -> None:
    data = b"".join(
        json.dumps({"query": "q", "documents": ["x" * 1000]}).encode() + b"\n" for _ in range(600)
    )
    path = tmp_path / "requests.jsonl"
    path.write_bytes(data)
    transport, seen = recording(created)
    with Client("http://api.test", "t", transport=transport) as client:
        client.submit(path)
        client.submit(str(path), query="corpus query")
        client.submit(io.BytesIO(data))
    assert [body for _, body, _ in seen] == [data, data, data]
    assert all(chunks > 1 for _, _, chunks in seen)  # several reads, not one
    assert seen[1][0].url.params["query"] == "corpus query"


def test_submit_refuses_a_text_mode_file(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text('{"query": "q", "documents": ["d"]}\n')
    transport, _ = recording(created)
    with (
        Client("http://api.test", "t", transport=transport) as client,
        path.open() as text_file,
        pytest.raises(TypeError, match="binary"),
    ):
        client.submit(text_file)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, api_client.InvalidRequest),
        (401, api_client.Unauthorized),
        (404, api_client.NotFound),
        (429, api_client.RateLimited),
        (502, api_client.ServerError),
        (409, api_client.APIError),
    ],
)
def test_an_error_answer_raises_its_class_with_status_type_line_and_field(
    status: int, kind: type[api_client.APIError]
) -> None:
    error = {"type": "invalid_request", "message": "required", "line": 3, "field": "query"}
    transport, _ = recording(lambda _: httpx.Response(status, json={"error": error}))
    with (
        Client("http://api.test", "t", transport=transport) as client,
        pytest.raises(kind) as raised,
    ):
        client.get("j1")
    assert type(raised.value) is kind
    assert raised.value.status == status
    assert (raised.value.type, raised.value.message) == ("invalid_request", "required")
    assert (raised.value.line, raised.value.field) == (3, "query")
    assert "line 3" in str(raised.value) and "field 'query'" in str(raised.value)


def test_an_error_that_is_not_json_still_raises_with_its_status() -> None:
    transport, _ = recording(lambda _: httpx.Response(503, text="<html>bad gateway</html>"))
    with (
        Client("http://api.test", "t", transport=transport) as client,
        pytest.raises(api_client.ServerError) as raised,
    ):
        client.usage()
    assert raised.value.status == 503 and "bad gateway" in raised.value.message


def test_an_unreachable_api_raises_a_connection_error() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with (
        Client("http://api.test", "t", transport=httpx.MockTransport(refuse)) as client,
        pytest.raises(api_client.APIConnectionError) as raised,
    ):
        client.rerank("q", ["d"])
    assert raised.value.status is None


def test_wait_long_polls_until_the_job_ended() -> None:
    states = iter(["running", "running", "completed"])
    transport, seen = recording(lambda _: httpx.Response(200, json={**JOB, "status": next(states)}))
    with Client("http://api.test", "t", transport=transport) as client:
        job = client.wait("j1")
    assert job.status == "completed" and job.ended
    assert [r.url.params["wait"] for r, _, _ in seen] == ["30.0"] * 3


def test_wait_gives_up_at_its_timeout() -> None:
    transport, _ = recording(lambda _: httpx.Response(200, json={**JOB, "status": "running"}))
    with (
        Client("http://api.test", "t", transport=transport) as client,
        pytest.raises(TimeoutError, match="still running"),
    ):
        client.wait("j1", timeout=0.05)


RESULT_LINES = [
    {
        "custom_id": "a",
        "status": "succeeded",
        "results": [{"index": 1, "relevance_score": 0.9}, {"index": 0, "relevance_score": 0.1}],
        "usage": {"total_tokens": 12},
        "error": None,
    },
    {
        "custom_id": "b",
        "status": "failed",
        "results": [],
        "usage": {"total_tokens": 0},
        "error": {"type": "invalid_request", "message": "too long"},
    },
]


def results_answer(_: httpx.Request) -> httpx.Response:
    def body() -> Iterator[bytes]:
        for line in RESULT_LINES:
            yield json.dumps(line).encode() + b"\n"

    return httpx.Response(200, content=body(), headers={"content-type": "application/x-ndjson"})


def test_results_are_typed_lines() -> None:
    transport, _ = recording(results_answer)
    with Client("http://api.test", "t", transport=transport) as client:
        lines = list(client.results("j1"))
    assert [line.custom_id for line in lines] == ["a", "b"]
    assert [r.index for r in lines[0].results] == [1, 0]
    assert lines[0].total_tokens == 12 and lines[0].error is None
    assert lines[1].error == api_client.LineError("invalid_request", "too long")


def test_rerank_posts_jinas_body_and_reads_the_ranking() -> None:
    answer = {
        "model": "jina-reranker-m0",
        "usage": {"total_tokens": 7},
        "results": [{"index": 1, "relevance_score": 0.8, "document": {"text": "b"}}],
    }
    transport, seen = recording(lambda _: httpx.Response(200, json=answer))
    with Client("http://api.test", "t", transport=transport) as client:
        ranking = client.rerank("q", ["a", "b"], top_n=1, return_documents=True)
    assert json.loads(seen[0][1]) == {
        "query": "q",
        "documents": ["a", "b"],
        "top_n": 1,
        "return_documents": True,
    }
    assert ranking.total_tokens == 7 and ranking.model == "jina-reranker-m0"
    assert ranking.results == [api_client.RankedDocument(1, 0.8, {"text": "b"})]


def test_the_async_client_streams_and_reads_alike(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"query": "q", "documents": ["d"]}\n' * 20_000)
    bodies: list[bytes] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/results"):
            lines = b"".join(json.dumps(line).encode() + b"\n" for line in RESULT_LINES)
            return httpx.Response(200, content=lines)
        bodies.append(b"".join([chunk async for chunk in request.stream]))  # type: ignore[union-attr]
        return httpx.Response(201, json=JOB)

    async def documents() -> Any:
        for i in range(3):
            yield {"text": f"doc {i}"}

    async def main() -> list[str]:
        transport = httpx.MockTransport(handler)
        async with AsyncClient("http://api.test", "t", transport=transport) as client:
            await client.submit(path)
            await client.submit(documents(), query="q")
            await client.submit([{"query": "q", "documents": ["d"]}])
            return [line.custom_id async for line in client.results("j1")]

    assert anyio.run(main) == ["a", "b"]
    assert bodies[0] == path.read_bytes()
    assert bodies[1].splitlines() == [b'{"text":"doc 0"}', b'{"text":"doc 1"}', b'{"text":"doc 2"}']
    assert json.loads(bodies[2]) == {"query": "q", "documents": ["d"]}
