"""The retry policy: Retry-After parsing, full-jitter backoff, and which of the two wins."""

from __future__ import annotations

import random

import httpx
import pytest

from worker import constants
from worker.upstream.retry import RetryPolicy, parse_retry_after

HTTP_DATE = "Wed, 21 Oct 2015 07:28:00 GMT"
HTTP_DATE_S = 1445412480.0


@pytest.mark.parametrize(
    ("headers", "expected_s"),
    [
        ({"retry-after": "7"}, 7.0),
        ({"retry-after": "0"}, 0.0),
        ({"retry-after": "2.5"}, 2.5),
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after-ms": "250.5"}, 0.2505),
        # milliseconds win over seconds when both are given
        ({"retry-after-ms": "100", "retry-after": "30"}, 0.1),
        # unreadable milliseconds fall back to the seconds header
        ({"retry-after-ms": "soon", "retry-after": "4"}, 4.0),
    ],
)
def test_retry_after_seconds_and_milliseconds(headers: dict[str, str], expected_s: float) -> None:
    assert parse_retry_after(headers) == pytest.approx(expected_s)


def test_retry_after_header_names_are_case_insensitive_on_httpx_headers() -> None:
    assert parse_retry_after(httpx.Headers({"Retry-After": "3"})) == 3.0
    assert parse_retry_after(httpx.Headers({"Retry-After-Ms": "20"})) == pytest.approx(0.02)


def test_retry_after_as_an_http_date_is_the_time_left_until_it() -> None:
    assert parse_retry_after({"retry-after": HTTP_DATE}, now_s=HTTP_DATE_S - 120) == pytest.approx(
        120.0
    )


def test_retry_after_as_an_http_date_in_the_past_is_zero() -> None:
    assert parse_retry_after({"retry-after": HTTP_DATE}, now_s=HTTP_DATE_S + 60) == 0.0


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"retry-after": ""},
        {"retry-after": "soon"},
        {"retry-after": "Wed, 99 Foo 2015"},
        {"retry-after-ms": "x"},
        {"x-other": "5"},
    ],
)
def test_unreadable_or_absent_retry_after_is_none(headers: dict[str, str]) -> None:
    assert parse_retry_after(headers) is None


@pytest.mark.parametrize(
    "headers", [{"retry-after": "-5"}, {"retry-after": "-0.5"}, {"retry-after-ms": "-300"}]
)
def test_negative_retry_after_is_zero(headers: dict[str, str]) -> None:
    assert parse_retry_after(headers) == 0.0


def test_backoff_stays_within_full_jitter_bounds_for_many_draws() -> None:
    policy = RetryPolicy(base_s=0.5, cap_s=8.0)
    rng = random.Random(1234)
    for failures in range(1, 10):
        ceiling = min(8.0, 0.5 * 2 ** (failures - 1))
        draws = [policy.backoff_s(failures, rng) for _ in range(500)]
        assert all(0.0 <= d <= ceiling for d in draws), failures
        # Full jitter spreads over the whole range, not a narrow band near the ceiling.
        assert min(draws) < ceiling * 0.1
        assert max(draws) > ceiling * 0.9


def test_backoff_grows_with_failures_until_the_cap() -> None:
    policy = RetryPolicy(base_s=0.5, cap_s=8.0)

    def mean(failures: int) -> float:
        rng = random.Random(99)
        return sum(policy.backoff_s(failures, rng) for _ in range(2000)) / 2000

    means = [mean(n) for n in range(1, 8)]
    # 0.5, 1, 2, 4, 8, 8, 8 -> mean is half of each ceiling
    assert means[:5] == sorted(means[:5])
    for n, expected_ceiling in enumerate([0.5, 1, 2, 4, 8, 8, 8], start=1):
        assert means[n - 1] == pytest.approx(expected_ceiling / 2, rel=0.1), n
    assert means[4] == pytest.approx(means[6], rel=0.1)


def test_backoff_is_reproducible_with_a_seeded_rng() -> None:
    policy = RetryPolicy()
    first = [policy.backoff_s(3, random.Random(5)) for _ in range(3)]
    assert len(set(first)) == 1


def test_backoff_with_zero_failures_uses_the_base() -> None:
    policy = RetryPolicy(base_s=0.5, cap_s=8.0)
    rng = random.Random(3)
    assert all(0.0 <= policy.backoff_s(0, rng) <= 0.5 for _ in range(200))


def test_delay_without_retry_after_is_the_backoff() -> None:
    policy = RetryPolicy(base_s=0.5, cap_s=8.0)
    assert policy.delay_s(3, None, random.Random(7)) == policy.backoff_s(3, random.Random(7))


def test_delay_honours_a_retry_after_longer_than_the_backoff() -> None:
    policy = RetryPolicy(base_s=0.5, cap_s=8.0)
    rng = random.Random(11)
    # far above the backoff cap, still below the Retry-After cap
    assert all(policy.delay_s(2, 30.0, rng) == 30.0 for _ in range(100))


def test_delay_keeps_the_backoff_when_retry_after_is_shorter() -> None:
    policy = RetryPolicy(base_s=0.5, cap_s=8.0)
    expected = policy.backoff_s(5, random.Random(21))
    assert expected > 0.001
    assert policy.delay_s(5, 0.001, random.Random(21)) == expected


def test_delay_caps_a_huge_retry_after() -> None:
    policy = RetryPolicy(base_s=0.5, cap_s=8.0)
    assert policy.delay_s(1, 10 * constants.MAX_RETRY_AFTER_S, random.Random(1)) == (
        constants.MAX_RETRY_AFTER_S
    )


def test_defaults_come_from_constants() -> None:
    policy = RetryPolicy()
    assert policy.max_attempts == constants.DEFAULT_MAX_ATTEMPTS
    assert policy.base_s == constants.DEFAULT_BACKOFF_BASE_S
    assert policy.cap_s == constants.DEFAULT_BACKOFF_CAP_S


@pytest.mark.parametrize("raw", ["inf", "1e999", "Infinity"])
def test_an_infinite_retry_after_is_not_returned_as_infinity(raw: str) -> None:
    value = parse_retry_after({"retry-after": raw})
    assert value is None or value <= constants.MAX_RETRY_AFTER_S
