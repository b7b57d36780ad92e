"""Synchronous rerank over HTTP: Jina's and Cohere's shapes answered from real workers.

A real `rerank-worker api` process, a real worker process, the stand-in over HTTP, Redis, and
SQLite then PostgreSQL. Each rerank is a one-request interactive job of the caller's tenant:
its ranking is the stand-in's, its usage the tenant's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import cohere
import httpx
import pytest
from conftest import ApiServer, Env
from jobs_support import assert_no_secret

from worker.standin import ThreadedStandin
from worker.standin.scoring import rank

PER_CALL = 4


@pytest.fixture
def served(
    database_url: str,
    make_env: Callable[..., Env],
    start_api: Callable[..., ApiServer],
) -> ApiServer:
    """The API beside one worker that sends at most PER_CALL documents per upstream call."""
    env = make_env(database_url, RERANK_MAX_DOCUMENTS_PER_CALL=str(PER_CALL))
    server = start_api(env, drop=("RERANK_API_KEYS",))
    server.create_token("acme")
    server.create_token("globex")
    env.start_worker(concurrency=4)
    return server


def documents(count: int, tag: str) -> list[Any]:
    """Strings, text objects and an image, as Jina takes them."""
    made: list[Any] = []
    for i in range(count):
        if i % 3 == 0:
            made.append(f"plain document {i} about {tag}")
        elif i % 3 == 1:
            made.append({"text": f"text object {i} on {tag}"})
        else:
            made.append({"image": f"https://example.test/{tag}/{i}.png"})
    return made


def test_jina_shape_answers_the_standins_ranking_with_documents_and_usage(
    served: ApiServer, standin: ThreadedStandin
) -> None:
    docs = documents(3, "boots")
    with served.client("acme") as client:
        answer = client.post("/v1/rerank", json={"query": "waterproof boots", "documents": docs})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    # Jina's default is return_documents true: each result carries its document.
    expected, tokens = rank("waterproof boots", docs, None, True)
    assert body == {
        "model": "jina-reranker-m0",
        "usage": {"total_tokens": tokens},
        "results": expected,
    }
    assert "submit;dur=" in answer.headers["server-timing"]
    with served.client("acme") as client:
        job = client.get(f"/v1/jobs/{answer.headers['rerank-job-id']}").json()
    assert (job["priority"], job["status"], job["source"]) == (
        "interactive",
        "completed",
        "POST /v1/rerank",
    )
    assert standin.stats()["total"]["tokens_billed"] == tokens
    assert_no_secret(answer.text, served.log())


def test_a_request_larger_than_one_call_is_split_and_merged_at_both_jina_paths(
    served: ApiServer, standin: ThreadedStandin
) -> None:
    docs = documents(PER_CALL * 3 - 1, "split")  # three upstream calls
    bodies = [
        ("/v1/rerank", {"query": "split me", "documents": docs, "top_n": 5}),
        (
            "/jina/v1/rerank",
            {"query": "split me too", "documents": docs, "return_documents": False},
        ),
    ]
    with served.client("acme") as client:
        for path, request in bodies:
            answer = client.post(path, json=request)
            assert answer.status_code == 200, answer.text
            expected, tokens = rank(
                request["query"],
                docs,
                request.get("top_n"),
                bool(request.get("return_documents", True)),
            )
            assert answer.json()["results"] == expected
            assert answer.json()["usage"] == {"total_tokens": tokens}
        usage = client.get("/v1/usage").json()
    assert standin.stats()["total"]["ok"] == 6
    # Every token the stand-in billed is the caller's, and nobody else's.
    assert usage["total_tokens"] == standin.stats()["total"]["tokens_billed"]
    assert usage["billed_calls"] == 6
    with served.client("globex") as other:
        assert other.get("/v1/usage").json()["total_tokens"] == 0
        assert other.get("/v1/jobs").json()["data"] == []
    with served.client("acme") as client:
        jobs = client.get("/v1/jobs").json()["data"]
    assert [(job["priority"], job["status"]) for job in jobs] == [("interactive", "completed")] * 2


def test_cohere_v2_shape_and_the_official_cohere_sdk(
    served: ApiServer, standin: ThreadedStandin
) -> None:
    docs = [f"cohere document {i}" for i in range(PER_CALL + 2)]
    with served.client("acme") as client:
        # What the SDK sends besides the contract's fields is accepted, not refused.
        answer = client.post(
            "/v2/rerank",
            json={
                "model": "jina-reranker-m0",
                "query": "which one",
                "documents": docs,
                "top_n": 3,
                "max_tokens_per_doc": 512,
                "priority": 0,
            },
        )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    expected, tokens = rank("which one", docs, 3, False)
    assert body["results"] == expected
    assert body["meta"]["billed_units"] == {"search_units": 2, "input_tokens": tokens}
    assert len(body["id"]) == 32

    # The SDK as a service would use it; only its HTTP client is ours, to be closed.
    with httpx.Client(timeout=60) as http:
        sdk = cohere.ClientV2(
            api_key=served.tokens["acme"], base_url=served.base_url, httpx_client=http
        )
        response = sdk.rerank(
            model="jina-reranker-m0", query="through the sdk", documents=docs, top_n=4
        )
        bad = cohere.ClientV2(
            api_key="rrw_not_a_token", base_url=served.base_url, httpx_client=http
        )
        with pytest.raises(cohere.errors.UnauthorizedError):
            bad.rerank(model="jina-reranker-m0", query="q", documents=["d"])
    expected, _ = rank("through the sdk", docs, 4, False)
    assert [(r.index, r.relevance_score) for r in response.results] == [
        (e["index"], e["relevance_score"]) for e in expected
    ]
    assert response.id is not None
    with served.client("acme") as client:
        job = client.get(f"/v1/jobs/{response.id}").json()
    assert (job["status"], job["priority"], job["succeeded"]) == ("completed", "interactive", 1)


BAD_BODIES = [
    ({"query": "q", "documents": []}, "documents"),
    ({"query": "q", "documents": ["ok", {"txt": "typo"}]}, "documents[1].txt"),
    ({"query": "q", "documents": ["ok", "  "]}, "documents[1]"),
    ({"query": " ", "documents": ["d"]}, "query"),
    ({"query": "q", "documents": ["d"], "top_n": 0}, "top_n"),
    ({"documents": ["d"]}, "query"),
]


def test_bad_input_answers_400_naming_the_field_and_stores_nothing(served: ApiServer) -> None:
    with served.client("acme") as client:
        for body, field in BAD_BODIES:
            answer = client.post("/v1/rerank", json=body)
            assert answer.status_code == 400, (body, answer.text)
            error = answer.json()["error"]
            assert error["type"] == "invalid_request"
            assert error["field"] == field, (body, error)
            assert field.split(".")[0].split("[")[0] in error["message"]
        answer = client.post("/v2/rerank", json={"query": "q", "documents": [{"text": "x"}]})
        assert answer.status_code == 400
        assert client.get("/v1/jobs").json()["data"] == []
    with httpx.Client(base_url=served.base_url) as anonymous:
        answer = anonymous.post("/v1/rerank", json={"query": "q", "documents": ["d"]})
    assert answer.status_code == 401
    assert answer.json()["error"]["type"] == "unauthorized"


def test_an_upstream_refusal_is_400_and_no_usable_key_is_503(
    served: ApiServer, standin: ThreadedStandin
) -> None:
    with served.client("acme") as client:
        refused = client.post(
            "/v1/rerank", json={"model": "no-such-model", "query": "q", "documents": ["d"]}
        )
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert error["type"] == "invalid_request"
        assert "not supported" in error["message"]

        for name in ("alpha", "beta"):
            httpx.post(f"{standin.base_url}/_standin/revoke", json={"name": name, "status": 401})
        unusable = client.post("/v2/rerank", json={"query": "q", "documents": ["d"]})
        assert unusable.status_code == 503, unusable.text
        assert unusable.json()["error"]["type"] == "no_usable_key"
        job = client.get(f"/v1/jobs/{unusable.json()['error']['job']}").json()
        assert (job["status"], job["failed"]) == ("completed", 1)
        assert_no_secret(refused.text, unusable.text)


def test_without_workers_the_rerank_answers_504_at_its_deadline_and_is_cancelled(
    sqlite_url: str, make_env: Callable[..., Env], start_api: Callable[..., ApiServer]
) -> None:
    env = make_env(sqlite_url, RERANK_SYNC_TIMEOUT_S="1")
    server = start_api(env, drop=("RERANK_API_KEYS",))
    server.create_token("acme")
    with server.client("acme") as client:
        answer = client.post("/v1/rerank", json={"query": "q", "documents": ["d"]})
        assert answer.status_code == 504, answer.text
        error = answer.json()["error"]
        assert error["type"] == "timeout" and "1 s" in error["message"]
        job = client.get(f"/v1/jobs/{error['job']}").json()
    assert (job["status"], job["cancelled"]) == ("cancelled", 1)
