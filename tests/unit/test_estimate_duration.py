"""The time `estimate` gives: concurrency, and RPM/TPM when every key has them."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import SecretStr

from worker.service.estimate import duration_s
from worker.settings import ApiKey
from worker.upstream.token_estimate import estimate_search_units


@dataclass(frozen=True)
class LimitedKey(ApiKey):
    rpm: int | None = None
    tpm: int | None = None


def key(concurrency: int, rpm: int | None = None, tpm: int | None = None) -> LimitedKey:
    return LimitedKey("k", SecretStr("s"), concurrency, rpm=rpm, tpm=tpm)


def test_without_per_minute_limits_calls_go_in_waves_of_the_keys_slots() -> None:
    assert duration_s(100, 10**6, 0.5, [key(4), key(6)], 4) == (5.0, "concurrency")
    assert duration_s(0, 0, 0.5, [key(4)], 4) == (0.0, "concurrency")


def test_twice_the_rpm_takes_one_window_and_a_call() -> None:
    assert duration_s(200, 1000, 0.5, [key(500, rpm=100)], 4) == (60.5, "rpm")


def test_tpm_bounds_a_token_heavy_job() -> None:
    seconds, bound = duration_s(10, 1_000_000, 0.5, [key(50, rpm=1000, tpm=250_000)], 4)
    assert (seconds, bound) == (180.5, "tpm")


def test_a_key_without_the_limit_leaves_the_keys_unbounded_by_it() -> None:
    assert duration_s(200, 1000, 0.5, [key(100, rpm=10), key(100)], 4)[1] == "concurrency"


def test_a_search_unit_is_a_query_with_up_to_a_hundred_documents() -> None:
    assert (estimate_search_units(100), estimate_search_units(101)) == (1, 2)
