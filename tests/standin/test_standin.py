"""The rerank stand-in over real HTTP: response shapes, errors, faults and the counters."""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from worker.standin import StandinConfig, parse_keys, run_in_thread
from worker.standin.config import key_limits, parse_limits
from worker.standin.scoring import Document, count_tokens, rank, relevance_score
from worker.standin.server import ThreadedStandin

pytestmark = pytest.mark.timeout(30)

KEYS = {"alpha": "sk-alpha-secret", "beta": "sk-beta-secret"}
ALPHA = {"Authorization": f"Bearer {KEYS['alpha']}"}
BETA = {"Authorization": f"Bearer {KEYS['beta']}"}
DOCUMENTS: list[Document] = [
    "the cat sat on the mat",
    "quarterly revenue grew",
    {"text": "cats purr"},
]
BODY: dict[str, Any] = {"model": "jina-reranker-m0", "query": "cats", "documents": DOCUMENTS}
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def standin() -> Iterator[ThreadedStandin]:
    with run_in_thread(StandinConfig(keys=KEYS, image_tokens=7)) as handle:
        yield handle


@pytest.fixture
def client(standin: ThreadedStandin) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=standin.base_url, timeout=5) as http_client:
        yield http_client


def rerank(client: httpx.Client, headers: dict[str, str] = ALPHA, **changes: Any) -> httpx.Response:
    return client.post("/jina/v1/rerank", json={**BODY, **changes}, headers=headers)


def wait_until(condition: Callable[[], bool], timeout_s: float = 5) -> None:
    deadline_s = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline_s, "condition not met before the deadline"
        time.sleep(0.01)


def alpha_stats(standin: ThreadedStandin) -> dict[str, Any]:
    stats: dict[str, Any] = standin.stats()["keys"]["alpha"]
    return stats


def test_happy_path_has_jina_shape(client: httpx.Client) -> None:
    response = rerank(client)

    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    payload = response.json()
    assert set(payload) == {"model", "object", "usage", "results"}
    assert payload["model"] == "jina-reranker-m0"
    assert payload["object"] == "list"
    assert payload["usage"] == {"total_tokens": sum(count_tokens("cats", d) for d in DOCUMENTS)}
    scores = [r["relevance_score"] for r in payload["results"]]
    assert scores == sorted(scores, reverse=True)
    assert sorted(r["index"] for r in payload["results"]) == [0, 1, 2]
    for result in payload["results"]:
        document = DOCUMENTS[result["index"]]
        assert result["relevance_score"] == relevance_score("cats", document)
        assert result["document"] == ({"text": document} if isinstance(document, str) else document)


def test_short_path_is_the_same_api(client: httpx.Client) -> None:
    long_path = rerank(client).json()
    short_path = client.post("/v1/rerank", json=BODY, headers=ALPHA).json()
    assert short_path == long_path


def test_scores_are_deterministic_across_servers(client: httpx.Client) -> None:
    first = rerank(client).json()
    with (
        run_in_thread(StandinConfig(keys=KEYS, image_tokens=7, seed=99)) as other,
        httpx.Client(base_url=other.base_url) as other_client,
    ):
        assert rerank(other_client).json() == first
    assert rerank(client).json() == first


def test_top_n_keeps_the_best(client: httpx.Client) -> None:
    everything = rerank(client).json()["results"]
    best_two = rerank(client, top_n=2).json()
    assert best_two["results"] == everything[:2]
    assert best_two["usage"] == rerank(client).json()["usage"]
    assert rerank(client, top_n=50).json()["results"] == everything


def test_return_documents_false_omits_documents(client: httpx.Client) -> None:
    results = rerank(client, return_documents=False).json()["results"]
    assert all(set(r) == {"index", "relevance_score"} for r in results)
    assert all("document" in r for r in rerank(client, return_documents=True).json()["results"])


def test_image_documents_by_url_and_base64(client: httpx.Client) -> None:
    images = [
        {"image": "https://example.com/cat.png"},
        {"image": base64.b64encode(b"\x89PNG fake image bytes").decode()},
    ]
    response = rerank(client, documents=[*images, "a caption"], model="jina-reranker-m0")

    assert response.status_code == 200
    payload = response.json()
    assert payload["usage"]["total_tokens"] == 3 * 1 + 7 + 7 + 3
    returned = {r["index"]: r["document"] for r in payload["results"]}
    assert returned == {0: images[0], 1: images[1], 2: {"text": "a caption"}}


@pytest.mark.parametrize(
    ("headers", "err_code"),
    [
        ({}, -10001),
        ({"Authorization": "Bearer"}, -10001),
        ({"Authorization": "Bearer sk-unknown"}, -10005),
        ({"Authorization": KEYS["alpha"]}, -10005),
    ],
)
def test_auth_errors_have_302ai_shape(
    client: httpx.Client, standin: ThreadedStandin, headers: dict[str, str], err_code: int
) -> None:
    response = rerank(client, headers=headers)

    assert response.status_code == 401
    error = response.json()["error"]
    assert error["err_code"] == err_code
    assert set(error) == {"err_code", "message", "message_cn", "type"}
    assert "sk-" not in response.text
    assert standin.stats()["total"]["calls"] == 0


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (401, {"error": {"err_code": -10005}}),
        (403, {"detail": "AUTHZ_INSUFFICIENT_BALANCE: account balance is insufficient"}),
    ],
)
def test_revoked_key_is_refused_and_counted(
    client: httpx.Client, standin: ThreadedStandin, status: int, body: dict[str, Any]
) -> None:
    standin.revoke("alpha", status)

    response = rerank(client)

    assert response.status_code == status
    payload = response.json()
    assert payload.get("detail") == body.get("detail")
    assert payload.get("error", {}).get("err_code") == body.get("error", {}).get("err_code")
    assert KEYS["alpha"] not in response.text
    assert rerank(client, headers=BETA).status_code == 200
    assert alpha_stats(standin)["status_counts"] == {str(status): 1}


@pytest.mark.parametrize(
    ("changes", "detail"),
    [
        ({"model": "gpt-4"}, "model 'gpt-4' is not supported"),
        ({"model": None}, "'model'"),
        ({"query": ""}, "'query'"),
        ({"query": 7}, "'query'"),
        ({"documents": []}, "'documents'"),
        ({"documents": "one"}, "'documents'"),
        ({"documents": ["ok", 3]}, "documents[1]"),
        ({"documents": [{"text": "a", "image": "b"}]}, "documents[0]"),
        ({"documents": [{"image": ""}]}, "documents[0]"),
        ({"documents": ["d"] * 5}, "more than the maximum of 4"),
        ({"top_n": 0}, "'top_n'"),
        ({"top_n": "3"}, "'top_n'"),
        ({"top_n": True}, "'top_n'"),
        ({"return_documents": "yes"}, "'return_documents'"),
    ],
)
def test_invalid_bodies_get_400_naming_the_field(
    client: httpx.Client, standin: ThreadedStandin, changes: dict[str, Any], detail: str
) -> None:
    standin.update(max_documents=4, fault_429=1.0, latency_ms=5000)

    response = rerank(client, **changes)

    assert response.status_code == 400
    assert detail in response.json()["detail"]
    assert alpha_stats(standin)["status_counts"] == {"400": 1}


def test_non_json_body_gets_422(client: httpx.Client) -> None:
    response = client.post("/jina/v1/rerank", content=b"{not json", headers=ALPHA)
    assert response.status_code == 422
    assert isinstance(response.json()["detail"], str)


@pytest.mark.parametrize(("method", "path"), [("GET", "/jina/v1/rerank"), ("POST", "/v1/embed")])
def test_unknown_routes_get_404(client: httpx.Client, method: str, path: str) -> None:
    response = client.request(method, path, headers=ALPHA)
    assert response.status_code == 404
    assert response.json() == {"detail": "Not Found"}


@pytest.mark.parametrize(
    ("retry_after_s", "headers"),
    [
        (2, {"retry-after": "2"}),
        (1.5, {"retry-after": "2"}),
        (0.25, {"retry-after": "1", "retry-after-ms": "250"}),
    ],
)
def test_fault_429_sends_retry_after(
    client: httpx.Client, standin: ThreadedStandin, retry_after_s: float, headers: dict[str, str]
) -> None:
    standin.update(fault_429=1.0, retry_after_s=retry_after_s)

    response = rerank(client)

    assert response.status_code == 429
    assert response.json() == {"detail": "Rate limit exceeded"}
    sent = {name: response.headers.get(name) for name in ("retry-after", "retry-after-ms")}
    assert sent == {"retry-after": None, "retry-after-ms": None, **headers}


def test_fault_5xx_cycles_through_upstream_failures(
    client: httpx.Client, standin: ThreadedStandin
) -> None:
    standin.update(fault_5xx=1.0)

    responses = [rerank(client) for _ in range(3)]

    assert [r.status_code for r in responses] == [503, 502, 500]
    assert responses[0].headers["content-type"] == "text/html"
    assert "<h1>503 Service Unavailable</h1>" in responses[0].text
    assert responses[1].json()["error"]["err_code"] == -10003
    assert responses[2].json() == {"detail": "Internal Server Error"}
    assert alpha_stats(standin)["status_counts"] == {"503": 1, "502": 1, "500": 1}
    assert alpha_stats(standin)["ok"] == 0


def test_fault_drop_closes_without_answer(client: httpx.Client, standin: ThreadedStandin) -> None:
    standin.update(fault_drop=1.0)

    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        rerank(client)

    wait_until(lambda: alpha_stats(standin)["in_flight"] == 0)
    assert alpha_stats(standin)["drops"] == 1
    assert alpha_stats(standin)["status_counts"] == {}
    standin.update(fault_drop=0)
    assert rerank(client).status_code == 200


def test_fault_slow_answers_late(client: httpx.Client, standin: ThreadedStandin) -> None:
    standin.update(fault_slow=1.0, slow_ms=200)

    started_s = time.monotonic()
    response = rerank(client)

    assert response.status_code == 200
    assert time.monotonic() - started_s >= 0.2
    assert alpha_stats(standin)["slow"] == 1
    assert alpha_stats(standin)["ok"] == 1


def test_faults_follow_the_seed() -> None:
    config = StandinConfig(keys=KEYS, fault_429=0.3, fault_5xx=0.3, seed=7)

    def statuses() -> list[int]:
        with run_in_thread(config) as handle, httpx.Client(base_url=handle.base_url) as http:
            return [rerank(http).status_code for _ in range(20)]

    first = statuses()
    assert first == statuses()
    assert {200, 429} <= set(first)


def test_max_in_flight_counts_concurrent_requests(standin: ThreadedStandin) -> None:
    standin.update(latency_ms=500)
    concurrency = 8

    async def burst() -> list[int]:
        limits = httpx.Limits(max_connections=concurrency)
        async with httpx.AsyncClient(base_url=standin.base_url, limits=limits) as http:
            calls = [http.post("/v1/rerank", json=BODY, headers=ALPHA) for _ in range(concurrency)]
            return [r.status_code for r in await asyncio.gather(*calls)]

    assert asyncio.run(burst()) == [200] * concurrency
    stats = standin.stats()
    assert stats["keys"]["alpha"]["max_in_flight"] == concurrency
    assert stats["keys"]["alpha"]["in_flight"] == 0
    assert stats["total"]["max_in_flight"] == concurrency
    assert stats["keys"]["beta"]["max_in_flight"] == 0


def test_client_that_times_out_leaves_in_flight(standin: ThreadedStandin) -> None:
    standin.update(fault_slow=1.0, slow_ms=30000)

    with (
        httpx.Client(base_url=standin.base_url, timeout=0.3) as impatient,
        pytest.raises(httpx.ReadTimeout),
    ):
        rerank(impatient)

    wait_until(lambda: alpha_stats(standin)["in_flight"] == 0)
    stats = alpha_stats(standin)
    assert stats["client_closed"] == 1
    assert stats["ok"] == 0
    assert stats["status_counts"] == {}


def test_calls_during_pause_are_counted(client: httpx.Client, standin: ThreadedStandin) -> None:
    standin.update(fault_429=1.0, retry_after_s=60)
    assert rerank(client).status_code == 429
    standin.update(fault_429=0)

    assert rerank(client).status_code == 200
    assert rerank(client).status_code == 200
    assert rerank(client, headers=BETA).status_code == 200

    stats = standin.stats()
    assert stats["keys"]["alpha"]["calls_during_pause"] == 2
    assert stats["keys"]["beta"]["calls_during_pause"] == 0
    assert stats["total"]["calls_during_pause"] == 2


def test_pause_ends_after_retry_after(client: httpx.Client, standin: ThreadedStandin) -> None:
    standin.update(fault_429=1.0, retry_after_s=0)
    assert rerank(client).status_code == 429
    standin.update(fault_429=0)

    assert rerank(client).status_code == 200
    assert alpha_stats(standin)["calls_during_pause"] == 0


def test_counters_and_reset(client: httpx.Client, standin: ThreadedStandin) -> None:
    expected_tokens = rerank(client).json()["usage"]["total_tokens"]
    rerank(client, headers=BETA)
    rerank(client, model="nope")

    stats = standin.stats()
    assert stats["keys"]["alpha"]["calls"] == 2
    assert stats["keys"]["alpha"]["ok"] == 1
    assert stats["keys"]["alpha"]["tokens_billed"] == expected_tokens
    assert stats["keys"]["alpha"]["status_counts"] == {"200": 1, "400": 1}
    assert stats["total"]["calls"] == 3
    assert stats["total"]["tokens_billed"] == 2 * expected_tokens

    standin.reset()

    stats = standin.stats()
    assert stats["total"]["calls"] == 0
    assert stats["keys"]["alpha"] == stats["keys"]["beta"] == stats["total"]


def test_admin_endpoints_over_http(client: httpx.Client) -> None:
    assert rerank(client).status_code == 200
    assert client.get("/_standin/stats").json()["keys"]["alpha"]["ok"] == 1

    assert client.post("/_standin/config", json={"fault_5xx": 1.0}).status_code == 200
    assert rerank(client).status_code == 503
    assert client.post("/_standin/config", json={"fault_5xx": 2}).status_code == 400
    assert client.post("/_standin/config", json={"colour": "red"}).status_code == 400

    assert client.post("/_standin/reset").status_code == 200
    assert client.get("/_standin/stats").json()["total"]["calls"] == 0

    revoked = client.post("/_standin/revoke", json={"name": "beta", "status": 403})
    assert revoked.status_code == 200
    assert rerank(client, headers=BETA).status_code == 403
    assert client.post("/_standin/revoke", json={"name": "nobody"}).status_code == 400


def test_update_validates(standin: ThreadedStandin) -> None:
    with pytest.raises(ValueError, match="fault_drop"):
        standin.update(fault_drop=1.5)
    with pytest.raises(ValueError, match="colour"):
        standin.update(colour="red")
    with pytest.raises(ValueError):
        standin.revoke("alpha", 500)


def test_keep_alive_and_connection_close(client: httpx.Client) -> None:
    assert [rerank(client).status_code for _ in range(5)] == [200] * 5
    closing = client.post("/v1/rerank", json=BODY, headers={**ALPHA, "Connection": "close"})
    assert closing.status_code == 200
    assert closing.headers["connection"] == "close"
    assert rerank(client).status_code == 200


def test_parse_keys_reads_rerank_api_keys_syntax() -> None:
    assert parse_keys("alpha=sk-a, beta=sk-b@4,,gamma=sk@c") == {
        "alpha": "sk-a",
        "beta": "sk-b",
        "gamma": "sk@c",
    }
    with pytest.raises(ValueError) as bad:
        parse_keys("alpha=sk-a,sk-secret-without-name")
    assert "sk-secret" not in str(bad.value)
    with pytest.raises(ValueError, match="twice"):
        parse_keys("a=x,a=y")


def test_scoring_is_pure_and_bounded() -> None:
    score = relevance_score("q", {"text": "d"})
    assert 0 <= score < 1
    assert score == round(score, 6)
    assert relevance_score("q", {"text": "d"}) == score
    assert relevance_score("q", "d") != score
    assert count_tokens("abcd", "abcde", 9) == 1 + 2
    assert count_tokens("", {"image": "x"}, 9) == 1 + 9
    results, total = rank("q", ["a", "b", "c"], top_n=1, return_documents=False)
    assert len(results) == 1
    assert total == 3 * 2


def test_command_line_serves_until_sigterm(tmp_path: Path) -> None:
    port_file = tmp_path / "port"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "RERANK_STANDIN_KEYS": "alpha=sk-cli"}
    command = [sys.executable, "-m", "worker.standin", "--port", "0", "--port-file", str(port_file)]
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            line = process.stdout.readline().strip()
            port = int(port_file.read_text())
            assert line == f"standin listening on http://127.0.0.1:{port}"
            response = httpx.post(
                f"http://127.0.0.1:{port}/v1/rerank",
                json=BODY,
                headers={"Authorization": "Bearer sk-cli"},
            )
            assert response.status_code == 200
        finally:
            process.terminate()
        assert process.wait(timeout=10) == 0


# --- rate limits, as a provider enforces them -------------------------------------------------


def test_rpm_refuses_calls_beyond_the_window_and_counts_them(
    client: httpx.Client, standin: ThreadedStandin
) -> None:
    standin.update(rpm={"alpha": 3}, window_s=0.5)

    statuses = [rerank(client).status_code for _ in range(5)]
    refused = rerank(client)

    assert statuses == [200, 200, 200, 429, 429]
    assert refused.status_code == 429
    # Retry-After says when the oldest admitted call leaves the window.
    assert 0 < int(refused.headers["retry-after-ms"]) <= 500
    assert rerank(client, BETA).status_code == 200  # another key has its own window
    stats = standin.stats()
    assert stats["keys"]["alpha"]["refused_rpm"] == 3
    assert stats["keys"]["beta"]["refused_rpm"] == 0
    assert stats["total"]["refused_rpm"] == 3
    assert stats["total"]["refused_tpm"] == 0
    wait_until(lambda: rerank(client).status_code == 200, timeout_s=2)


def test_tpm_counts_the_stand_ins_own_tokens_and_refuses_beyond_them(
    client: httpx.Client, standin: ThreadedStandin
) -> None:
    _, tokens = rank(BODY["query"], DOCUMENTS, image_tokens=7)
    standin.update(tpm={"alpha": 5 * tokens}, token_factor=2, window_s=30)

    answers = [rerank(client) for _ in range(3)]

    assert [a.status_code for a in answers] == [200, 200, 429]
    # Billed at twice its own count: two calls fill 4 of the 5 call's worth.
    assert answers[0].json()["usage"]["total_tokens"] == 2 * tokens
    stats = alpha_stats(standin)
    refused = (stats["refused_tpm"], stats["refused_rpm"])
    assert (refused, stats["tokens_billed"]) == ((1, 0), 4 * tokens)


def test_a_rate_limit_429_comes_without_retry_after_when_so_configured(
    client: httpx.Client, standin: ThreadedStandin
) -> None:
    standin.update(rpm={"alpha": 1}, rate_limit_retry_after=False)

    assert rerank(client).status_code == 200
    refused = rerank(client)

    assert refused.status_code == 429
    assert "retry-after" not in refused.headers
    assert "retry-after-ms" not in refused.headers


def test_rate_limits_must_name_configured_keys_with_whole_numbers(
    standin: ThreadedStandin,
) -> None:
    for bad in ({"rpm": {"gamma": 3}}, {"tpm": {"alpha": 0}}, {"rpm": {"alpha": 1.5}}):
        with pytest.raises(ValueError):
            standin.update(**bad)
    with pytest.raises(ValueError, match="window_s"):
        standin.update(window_s=0)


def test_key_limits_come_from_flags_or_the_json_key_form() -> None:
    spec = '[{"name": "alpha", "secret": "sk-a", "rpm": 50}, {"name": "beta", "secret": "sk-b"}]'
    assert parse_keys(spec) == {"alpha": "sk-a", "beta": "sk-b"}
    assert key_limits(spec, "rpm") == {"alpha": 50}
    assert key_limits("alpha=sk-a", "rpm") == {}
    assert parse_limits("alpha=50, beta=7", "tpm") == {"alpha": 50, "beta": 7}
    with pytest.raises(ValueError) as bad:
        parse_keys('[{"name": "alpha", "secret": "sk-secret-1"}, {"secret": "sk-secret-2"}]')
    assert "sk-secret" not in str(bad.value)
