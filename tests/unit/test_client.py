"""RerankClient: the request it sends and how every kind of answer is classified.

httpx.MockTransport stands in for the network: what is tested is the client's own logic
(building the call, reading every body shape, mapping statuses to errors), not a process.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from worker import errors
from worker.settings import ApiKey
from worker.upstream.client import (
    KEY_UNUSABLE_S,
    MAX_MESSAGE_CHARS,
    CallResult,
    RerankClient,
    build_body,
)

SECRET = "sk-test-alpha-0123456789abcdef"
KEY = ApiKey(name="alpha", secret=SecretStr(SECRET), max_concurrency=2)
BASE_URL = "https://upstream.test"
PATH = "/jina/v1/rerank"
DOCUMENTS_JSON = ['"plain text"', '{"text":"object text"}', '{"image":"https://x.test/a.png"}']
DOCUMENTS = [json.loads(d) for d in DOCUMENTS_JSON]

Handler = Callable[[httpx.Request], httpx.Response | Awaitable[httpx.Response]]


def body(**overrides: Any) -> bytes:
    fields: dict[str, Any] = {
        "model": "jina-reranker-m0",
        "query": "which one",
        "documents_json": DOCUMENTS_JSON,
        "top_n": None,
        "return_documents": False,
    }
    fields.update(overrides)
    return build_body(**fields)


def call(handler: Handler, payload: bytes | None = None, timeout_s: float = 5.0) -> CallResult:
    async def main() -> CallResult:
        client = RerankClient(BASE_URL, timeout_s=timeout_s, transport=httpx.MockTransport(handler))
        try:
            return await client.rerank(KEY, PATH, payload if payload is not None else body())
        finally:
            await client.aclose()

    return asyncio.run(main())


def call_error(handler: Handler) -> errors.UpstreamError:
    with pytest.raises(errors.UpstreamError) as caught:
        call(handler)
    error = caught.value
    # Every error names the key and never carries its secret.
    assert error.key_name == "alpha"
    assert SECRET not in str(error)
    assert SECRET not in error.message
    assert SECRET not in repr(error)
    return error


def answer(status: int, **kwargs: Any) -> Handler:
    return lambda request: httpx.Response(status, **kwargs)


def api_error(code: int, message: str = "upstream says no") -> dict[str, Any]:
    return {"error": {"err_code": code, "message": message, "message_cn": "不行", "type": "api"}}


SUCCESS = {
    "model": "jina-reranker-m0",
    "usage": {"total_tokens": 321},
    "results": [
        {"index": 2, "relevance_score": 0.9},
        {"index": 0, "relevance_score": 0.5},
        {"index": 1, "relevance_score": 0.1},
    ],
}


# --- success and the request sent ------------------------------------------------------------


def test_a_success_is_parsed_into_results_tokens_and_latency() -> None:
    async def slow_ok(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.02)  # simulated upstream latency, measured by the client
        return httpx.Response(200, json=SUCCESS)

    result = call(slow_ok)
    assert result.results == SUCCESS["results"]
    assert result.total_tokens == 321
    assert result.status_code == 200
    assert result.latency_ms >= 20


def test_a_success_without_usage_is_flagged_rather_than_counted_as_zero() -> None:
    result = call(answer(200, json={"results": []}))
    assert result.results == []
    assert result.total_tokens == 0
    assert result.usage_known is False


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"usage": {"total_tokens": 12}}, (12, 0, True)),
        ({"meta": {"billed_units": {"input_tokens": 30, "output_tokens": 2}}}, (32, 0, True)),
        ({"meta": {"billed_units": {"total_tokens": 7}}}, (7, 0, True)),
        ({"meta": {"billed_units": {"search_units": 3}}}, (0, 3, True)),
        ({"meta": {"tokens": {"input_tokens": 40, "output_tokens": 0}}}, (40, 0, True)),
        ({"tokens": {"input_tokens": 55}}, (55, 0, True)),
        ({"meta": {"api_version": {"version": "2"}}}, (0, 0, False)),
        ({}, (0, 0, False)),
    ],
    ids=[
        "usage",
        "billed-tokens",
        "billed-total",
        "search-units",
        "meta-tokens",
        "tokens",
        "meta-without",
        "none",
    ],
)
def test_every_usage_shape_is_read(body: dict[str, Any], expected: tuple[int, int, bool]) -> None:
    result = call(answer(200, json={"results": [], **body}))
    assert (result.total_tokens, result.search_units, result.usage_known) == expected


def test_each_key_calls_with_its_own_bearer_on_one_client() -> None:
    """Keys have pools of their own; a call never goes out with another key's secret."""
    other = ApiKey(name="beta", secret=SecretStr("sk-other-secret-42"), max_concurrency=1)
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["authorization"])
        return httpx.Response(200, json=SUCCESS)

    async def main() -> None:
        client = RerankClient(BASE_URL, timeout_s=5, transport=httpx.MockTransport(handler))
        try:
            for key in (KEY, other, KEY, other):
                await client.rerank(key, PATH, body())
        finally:
            await client.aclose()

    asyncio.run(main())
    assert seen == [f"Bearer {SECRET}", "Bearer sk-other-secret-42"] * 2


def test_the_request_carries_the_body_and_the_bearer_key() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=SUCCESS)

    call(handler, body(top_n=2))
    [request] = seen
    assert request.method == "POST"
    assert str(request.url) == f"{BASE_URL}{PATH}"
    assert request.headers["authorization"] == f"Bearer {SECRET}"
    assert request.headers["content-type"] == "application/json"
    assert json.loads(request.content) == {
        "model": "jina-reranker-m0",
        "query": "which one",
        "documents": DOCUMENTS,
        "top_n": 2,
        "return_documents": False,
    }


def test_documents_are_sent_byte_for_byte_as_stored() -> None:
    seen: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.content)
        return httpx.Response(200, json=SUCCESS)

    stored = ['"ünïcode 中文 text"', '{"image":"iVBORw0KGgo="}']
    call(handler, body(documents_json=stored))
    assert b'"documents":[' + ",".join(stored).encode() + b"]" in seen[0]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            {},
            {
                "model": "jina-reranker-m0",
                "query": "which one",
                "documents": DOCUMENTS,
                "return_documents": False,
            },
        ),
        (
            {"top_n": 5, "return_documents": True, "query": 'a "quoted" ü query'},
            {
                "model": "jina-reranker-m0",
                "query": 'a "quoted" ü query',
                "documents": DOCUMENTS,
                "top_n": 5,
                "return_documents": True,
            },
        ),
        (
            {"documents_json": ['"only"']},
            {
                "model": "jina-reranker-m0",
                "query": "which one",
                "documents": ["only"],
                "return_documents": False,
            },
        ),
    ],
    ids=["defaults", "top_n-and-documents", "one-document"],
)
def test_build_body_is_the_expected_json(
    overrides: dict[str, Any], expected: dict[str, Any]
) -> None:
    assert json.loads(body(**overrides)) == expected


# --- classification of failures --------------------------------------------------------------


def test_429_with_retry_after_is_rate_limited_for_that_long() -> None:
    error = call_error(answer(429, headers={"retry-after": "7"}, json={"detail": "slow down"}))
    assert type(error) is errors.RateLimited
    assert isinstance(error, errors.RetryableError)
    assert error.retry_after_s == 7.0
    assert error.status_code == 429
    assert "slow down" in error.message


def test_429_without_retry_after_is_rate_limited_without_a_delay() -> None:
    error = call_error(answer(429, text="Too Many Requests"))
    assert type(error) is errors.RateLimited
    assert error.retry_after_s is None


def test_503_html_from_a_proxy_is_retryable_and_keeps_the_text() -> None:
    html = "<html><body><h1>503 Service Temporarily Unavailable</h1>\n<hr>nginx</body></html>"
    error = call_error(answer(503, text=html, headers={"content-type": "text/html"}))
    assert type(error) is errors.RetryableError
    assert error.status_code == 503
    assert "503 Service Temporarily Unavailable" in error.message


def test_500_with_a_detail_is_retryable_with_that_detail() -> None:
    error = call_error(answer(500, json={"detail": "Internal inference failure"}))
    assert type(error) is errors.RetryableError
    assert error.status_code == 500
    assert "Internal inference failure" in error.message


def test_502_retry_after_is_carried_on_a_retryable_error() -> None:
    error = call_error(answer(502, headers={"retry-after-ms": "1500"}, text="bad gateway"))
    assert type(error) is errors.RetryableError
    assert error.retry_after_s == pytest.approx(1.5)


def test_408_is_retryable() -> None:
    error = call_error(answer(408, text="Request Timeout"))
    assert type(error) is errors.RetryableError
    assert error.status_code == 408


@pytest.mark.parametrize("status", [401, 403])
def test_401_and_403_take_the_key_out_of_use(status: int) -> None:
    error = call_error(answer(status, json={"detail": "Invalid API key"}))
    assert type(error) is errors.KeyUnusable
    assert isinstance(error, errors.KeyUnusable)
    assert error.status_code == status
    assert error.until_s == KEY_UNUSABLE_S
    assert "Invalid API key" in error.message


def test_jina_insufficient_balance_takes_the_key_out_of_use() -> None:
    detail = "AUTHZ_INSUFFICIENT_BALANCE: your balance is too low"
    error = call_error(answer(403, json={"detail": detail}))
    assert isinstance(error, errors.KeyUnusable)
    assert "AUTHZ_INSUFFICIENT_BALANCE" in error.message


@pytest.mark.parametrize("status", [400, 404, 413, 422])
def test_other_4xx_reject_the_request_with_the_upstream_message(status: int) -> None:
    error = call_error(answer(status, json={"detail": "documents: too many items"}))
    assert type(error) is errors.RequestRejected
    assert error.status_code == status
    assert "documents: too many items" in error.message


def test_a_structured_detail_is_kept_as_json() -> None:
    detail = [{"loc": ["body", "query"], "msg": "field required"}]
    error = call_error(answer(422, json={"detail": detail}))
    assert type(error) is errors.RequestRejected
    assert "field required" in error.message


@pytest.mark.parametrize(
    ("status", "code"), [(502, -10003), (503, -10008), (504, -1024), (400, -10003)]
)
def test_302ai_network_channel_and_timeout_codes_are_retried(status: int, code: int) -> None:
    error = call_error(answer(status, json=api_error(code, "try later")))
    assert type(error) is errors.RetryableError
    assert error.status_code == status
    assert "try later" in error.message


@pytest.mark.parametrize("code", [-10004, -10005, -10006, -10018])
@pytest.mark.parametrize("status", [400, 401, 402, 403, 429])
def test_302ai_balance_credential_and_quota_codes_take_the_key_out_for_an_hour(
    status: int, code: int
) -> None:
    error = call_error(answer(status, json=api_error(code, "quota reached")))
    assert isinstance(error, errors.KeyUnusable)
    assert error.until_s == 3600
    assert "quota reached" in error.message


def test_302ai_daily_quota_takes_the_key_out_until_the_next_day() -> None:
    error = call_error(answer(429, json=api_error(-10007, "daily quota reached")))
    assert isinstance(error, errors.KeyUnusable)
    assert error.until_s is not None
    assert 0 < error.until_s <= 86400


@pytest.mark.parametrize("code", [-10001, -10011])
def test_302ai_missing_key_and_invalid_request_fail_the_request(code: int) -> None:
    error = call_error(answer(400, json=api_error(code, "invalid request body")))
    assert type(error) is errors.RequestRejected
    assert "invalid request body" in error.message


@pytest.mark.parametrize("code", [-10001, -10011])
def test_302ai_missing_key_and_invalid_request_fail_whatever_the_status(code: int) -> None:
    # The stand-in (like 302.AI) answers a missing key with 401: still a failed request,
    # not a key to take out of use.
    error = call_error(answer(401, json=api_error(code, "Missing API key")))
    assert type(error) is errors.RequestRejected
    assert "Missing API key" in error.message


def test_a_302ai_error_without_a_message_is_still_described() -> None:
    error = call_error(answer(400, json={"error": {"err_code": -10011}}))
    assert type(error) is errors.RequestRejected
    assert "-10011" in error.message


def test_a_very_long_error_body_is_truncated() -> None:
    error = call_error(answer(500, text="x" * 10_000))
    assert error.message.count("x") == MAX_MESSAGE_CHARS


@pytest.mark.parametrize(
    "payload",
    [b"not json at all", b'{"usage": {"total_tokens": 1}}', b'{"results": "nope"}', b"[]", b"null"],
    ids=["text", "no-results", "results-not-list", "list", "null"],
)
def test_a_malformed_200_is_retryable(payload: bytes) -> None:
    error = call_error(answer(200, content=payload))
    assert type(error) is errors.RetryableError
    assert error.status_code == 200
    assert "malformed" in error.message


def test_a_200_with_usage_not_an_object_is_retryable() -> None:
    error = call_error(answer(200, json={"results": [], "usage": [5]}))
    assert type(error) is errors.RetryableError


@pytest.mark.parametrize(
    ("exc_type", "expected"),
    [
        (httpx.ConnectError, errors.ConnectionFailed),
        (httpx.ReadTimeout, errors.UpstreamTimeout),
        (httpx.RemoteProtocolError, errors.ConnectionFailed),
        (httpx.ReadError, errors.ConnectionFailed),
    ],
)
def test_a_transport_failure_is_retryable(
    exc_type: type[httpx.TransportError], expected: type[errors.RetryableError]
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc_type(f"boom with {SECRET}", request=request)

    error = call_error(handler)
    assert type(error) is expected
    assert isinstance(error, errors.RetryableError)
    assert error.status_code is None


def test_a_call_slower_than_the_timeout_is_retryable() -> None:
    never = asyncio.Event()

    async def hang(request: httpx.Request) -> httpx.Response:
        await never.wait()
        return httpx.Response(200, json=SUCCESS)

    with pytest.raises(errors.UpstreamTimeout) as caught:
        call(hang, timeout_s=0.05)
    assert "timed out" in caught.value.message
    assert caught.value.key_name == "alpha"
    assert SECRET not in str(caught.value)


def test_a_corrupt_compressed_body_is_retryable() -> None:
    error = call_error(answer(200, headers={"content-encoding": "gzip"}, content=b"not gzip"))
    assert type(error) is errors.RetryableError


# --- the secret never leaks ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "kwargs"),
    [
        (401, {"json": {"detail": f"Invalid key {SECRET}"}}),
        (403, {"json": api_error(-10005, f"key Bearer {SECRET} expired")}),
        (400, {"json": {"message": f"bad key {SECRET}"}}),
        (400, {"json": {"error": f"bad key {SECRET}"}}),
        (502, {"text": f"<html>upstream said: Authorization: Bearer {SECRET}</html>"}),
        (429, {"json": {"error": {"err_code": 42, "echo": SECRET}}}),
    ],
    ids=["detail", "302ai", "message", "error-string", "html", "unknown-302ai-shape"],
)
def test_an_error_body_echoing_the_secret_never_leaks_it(status: int, kwargs: Any) -> None:
    error = call_error(answer(status, **kwargs))
    assert "***" in error.message
    assert SECRET not in str(error)


def test_a_malformed_200_echoing_the_secret_never_leaks_it() -> None:
    with pytest.raises(errors.RetryableError) as caught:
        call(answer(200, json={"results": [], "usage": {"total_tokens": SECRET}}))
    assert SECRET not in str(caught.value)
