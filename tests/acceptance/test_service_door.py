"""Issue 13's acceptance run through the outside interface (CONTRACT.md): `rerank-worker api`,
two workers and the stand-in answering 3% 5xx; two tenants; a job posted over HTTP with a
webhook whose first delivery fails; synchronous reranks in Jina's and Cohere's shapes."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import cohere
import httpx
import pytest
import standardwebhooks
from conftest import SECRETS, ApiServer, Env, Receiver, api_keys, wait_for
from jobs_support import expected_results, make_requests, results_of

from worker.standin import ThreadedStandin

ENDED = ("completed", "failed", "cancelled")


def create_token(env: Env, name: str) -> dict[str, str]:
    done = env.cli("tokens", "create", name, "--json")
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def test_two_tenants_use_the_service_door_end_to_end(
    make_env: Callable[..., Env],
    start_api: Callable[..., ApiServer],
    postgres_url: str,
    standin: ThreadedStandin,
    receiver: Receiver,
    request: pytest.FixtureRequest,
) -> None:
    env = make_env(
        postgres_url,
        api_keys(alpha=3, beta=2),
        RERANK_MAX_DOCUMENTS_PER_CALL="100",
        RERANK_WEBHOOK_ALLOW_PRIVATE="true",
        RERANK_WEBHOOK_RETRY_SCHEDULE_S="1",
        RERANK_WEBHOOK_POLL_INTERVAL_S="0.2",
    )
    standin.update(latency_ms=20, fault_5xx=0.03)
    receiver.answers = [500]
    acme, globex = create_token(env, "acme"), create_token(env, "globex")
    api = start_api(env, drop=("RERANK_API_KEYS",))
    env.start_worker(concurrency=6, name="one")
    env.start_worker(concurrency=6, name="two")
    auth = {name: {"Authorization": f"Bearer {t['token']}"} for name, t in
            (("acme", acme), ("globex", globex))}  # fmt: skip
    as_acme = httpx.Client(base_url=api.base_url, headers=auth["acme"], timeout=60)
    as_globex = httpx.Client(base_url=api.base_url, headers=auth["globex"], timeout=60)
    sdk_http = httpx.Client(timeout=60)
    for client in (as_acme, as_globex, sdk_http):
        request.addfinalizer(client.close)

    requests = make_requests(80, big_at=7)
    body = "".join(json.dumps(r) + "\n" for r in requests).encode()
    created = as_acme.post(
        "/v1/jobs",
        params={"webhook_url": receiver.url},
        content=body,
        headers={"Content-Type": "application/x-ndjson"},
    )
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]

    def ended() -> dict[str, Any] | None:
        job: dict[str, Any] = as_acme.get(f"/v1/jobs/{job_id}", params={"wait": 10}).json()
        return job if job["status"] in ENDED else None

    job = wait_for(ended, 180, "the job to end")
    assert isinstance(job, dict)
    assert (job["status"], job["succeeded"], job["failed"]) == ("completed", 80, 0)

    over_http = as_acme.get(f"/v1/jobs/{job_id}/results")
    lines = [json.loads(line) for line in over_http.text.splitlines()]
    assert lines == results_of(env, job_id)
    for line, request in zip(lines, requests, strict=True):
        assert line["results"] == expected_results(request), line["custom_id"]
    assert len(requests[7]["documents"]) == 450

    for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/results"):
        assert as_globex.get(path).status_code == 404
    assert as_globex.post(f"/v1/jobs/{job_id}/cancel").status_code == 404
    assert job_id not in {j["id"] for j in as_globex.get("/v1/jobs").json()["data"]}

    wait_for(lambda: len(receiver.deliveries) >= 2, 60, "the webhook's second delivery")
    assert len(receiver.deliveries) == 2 and len(set(receiver.ids())) == 1
    hook = standardwebhooks.Webhook(acme["webhook_secret"])
    for delivery in receiver.deliveries:
        event = hook.verify(delivery.body, delivery.headers)
        assert (event["type"], event["data"]["id"]) == ("job.completed", job_id)

    query = "which document is about topic 7"
    documents = [f"document {i} about topic {i % 11} of {i % 13}" for i in range(230)]
    jina = as_globex.post(
        "/jina/v1/rerank",
        json={"model": "jina-reranker-m0", "query": query, "documents": documents, "top_n": 5},
    )
    assert jina.status_code == 200, jina.text
    top5 = expected_results({"query": query, "documents": documents, "top_n": 5})
    ranked = [(r["index"], r["relevance_score"]) for r in jina.json()["results"]]
    assert ranked == [(r["index"], r["relevance_score"]) for r in top5]
    sdk = cohere.ClientV2(api_key=globex["token"], base_url=api.base_url, httpx_client=sdk_http)
    answer = sdk.rerank(model="jina-reranker-m0", query=query, documents=documents[:40], top_n=3)
    top3 = expected_results({"query": query, "documents": documents[:40], "top_n": 3})
    assert [(r.index, r.relevance_score) for r in answer.results] == [
        (r["index"], r["relevance_score"]) for r in top3
    ]

    usage = [c.get("/v1/usage").json()["total_tokens"] for c in (as_acme, as_globex)]
    assert all(tokens > 0 for tokens in usage)
    assert sum(usage) == standin.stats()["total"]["tokens_billed"]

    answers = created.text + over_http.text + jina.text + json.dumps(job) + api.log()
    assert not any(secret in answers for secret in SECRETS.values())
