"""worker.client's Client and AsyncClient against the real API, a real worker and the stand-in."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import ApiServer, Env
from jobs_support import expected_results, make_requests, write_jsonl

from worker import client as api_client
from worker.client import AsyncClient, Client
from worker.standin import ThreadedStandin
from worker.standin.scoring import rank


@pytest.fixture
def env(database_url: str, make_env: Callable[..., Env]) -> Env:
    return make_env(database_url)


@pytest.fixture
def server(env: Env, start_api: Callable[..., ApiServer]) -> ApiServer:
    made = start_api(env, drop=("RERANK_API_KEYS",))
    made.create_token("acme")
    made.create_token("globex")
    return made


def ranked(line: api_client.ResultLine) -> list[dict[str, Any]]:
    return [{"index": r.index, "relevance_score": r.relevance_score} for r in line.results]


def test_the_client_submits_waits_reads_cancels_and_reranks(
    server: ApiServer, env: Env, standin: ThreadedStandin, tmp_path: Path
) -> None:
    requests = make_requests(6)
    path = write_jsonl(tmp_path / "requests.jsonl", requests)
    with Client(server.base_url, server.tokens["acme"]) as client:
        # No worker yet: the job stays queued until cancelled.
        queued = client.submit(path, priority="bulk", idempotency_key="first")
        assert (queued.status, queued.total_requests) == ("queued", 6)
        assert client.submit(path, idempotency_key="first").id == queued.id
        cancelled = client.cancel(queued.id)
        assert cancelled.status == "cancelled" and cancelled.ended

        env.start_worker(concurrency=4)
        from_path = client.wait(client.submit(path).id, timeout=120)
        assert (from_path.status, from_path.succeeded) == ("completed", 6)
        lines = list(client.results(from_path.id))
        assert [line.custom_id for line in lines] == [r["custom_id"] for r in requests]
        assert [ranked(line) for line in lines] == [expected_results(r) for r in requests]
        assert all(line.status == "succeeded" and line.error is None for line in lines)

        # An iterable of dicts, and a binary file object, stream alike.
        from_rows = client.wait(client.submit(iter(requests[:2])).id, timeout=120)
        with path.open("rb") as file:
            from_file = client.wait(client.submit(file).id, timeout=120)
        assert [ranked(line) for line in client.results(from_file.id)] == [
            expected_results(r) for r in requests
        ]
        corpus = [{"id": f"doc-{i}", "text": f"corpus text {i}"} for i in range(5)]
        from_corpus = client.wait(client.submit(corpus, query="corpus q", top_n=3).id)
        (line,) = client.results(from_corpus.id)
        expected, _ = rank("corpus q", [{"text": d["text"]} for d in corpus], 3, False)
        assert [(r.index, r.id) for r in line.results] == [
            (e["index"], f"doc-{e['index']}") for e in expected
        ]

        job_usage = client.usage(from_path.id)
        assert job_usage.total_tokens == sum(line.total_tokens for line in lines) > 0
        assert job_usage.billed_calls == 6
        assert client.get(from_rows.id).succeeded == 2
        assert {job.id for job in client.jobs()} >= {queued.id, from_path.id, from_corpus.id}

        docs = ["alpha doc", {"text": "beta doc"}, "gamma doc"]
        ranking = client.rerank("sync q", docs, top_n=2, return_documents=True)
        expected, tokens = rank("sync q", docs, 2, True)
        assert [(r.index, r.relevance_score, r.document) for r in ranking.results] == [
            (e["index"], e["relevance_score"], e["document"]) for e in expected
        ]
        assert ranking.total_tokens == tokens
        tenant_usage = client.usage()
    assert tenant_usage.total_tokens == standin.stats()["total"]["tokens_billed"]


def test_the_client_raises_errors_with_status_line_and_field(
    server: ApiServer, tmp_path: Path
) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(
        json.dumps({"query": "fine", "documents": ["d"]}) + "\n" + json.dumps({"query": "q"}) + "\n"
    )
    with Client(server.base_url, server.tokens["acme"]) as client:
        with pytest.raises(api_client.InvalidRequest) as bad:
            client.submit(path)
        assert (bad.value.status, bad.value.type) == (400, "invalid_request")
        assert (bad.value.line, bad.value.field) == (2, "documents")
        with pytest.raises(api_client.InvalidRequest) as bad_rerank:
            client.rerank("q", ["ok", {"txt": "typo"}])
        assert bad_rerank.value.field == "documents[1].txt"
        assert client.jobs() == []
        mine = client.submit([{"query": "q", "documents": ["d"]}])
    with Client(server.base_url, server.tokens["globex"]) as other:
        with pytest.raises(api_client.NotFound) as missing:
            other.get(mine.id)
        assert missing.value.status == 404
        with pytest.raises(api_client.NotFound):
            list(other.results(mine.id))
    with Client(server.base_url, "rrw_not_a_token") as stranger:
        with pytest.raises(api_client.Unauthorized) as refused:
            stranger.usage()
        assert refused.value.status == 401


def test_the_async_client_does_the_same_over_asyncio(
    server: ApiServer, env: Env, tmp_path: Path
) -> None:
    env.start_worker(concurrency=4)
    requests = make_requests(3)
    path = write_jsonl(tmp_path / "requests.jsonl", requests)

    async def rows() -> Any:
        for request in requests:
            yield request

    async def main() -> tuple[list[list[dict[str, Any]]], list[list[dict[str, Any]]], int]:
        async with AsyncClient(server.base_url, server.tokens["acme"]) as client:
            from_path = await client.wait((await client.submit(path)).id, timeout=120)
            from_rows = await client.wait((await client.submit(rows())).id, timeout=120)
            first = [ranked(line) async for line in client.results(from_path.id)]
            second = [ranked(line) async for line in client.results(from_rows.id)]
            ranking = await client.rerank("async q", ["one", "two"])
            with pytest.raises(api_client.NotFound):
                await client.cancel("0" * 32)
            return first, second, len(ranking.results)

    first, second, ranked_count = anyio.run(main)
    assert first == second == [expected_results(r) for r in requests]
    assert ranked_count == 2
