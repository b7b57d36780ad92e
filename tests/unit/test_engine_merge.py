"""Splitting a request into calls and merging the rankings; parsing the key list safely."""

from __future__ import annotations

import copy
import os
from typing import Any

import pytest
from pydantic import SecretStr

from worker import errors
from worker.domain import CachedScore
from worker.engine import cached_ranking, merge, split
from worker.settings import ApiKey, Settings, parse_api_keys


def r(index: int, score: float) -> dict[str, Any]:
    return {"index": index, "relevance_score": score}


def pairs(ranked: list[dict[str, Any]]) -> list[tuple[int, float]]:
    return [(e["index"], e["relevance_score"]) for e in ranked]


# --- split ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "per_call", "expected"),
    [
        (10, 5, [(0, 5), (5, 10)]),
        (9, 3, [(0, 3), (3, 6), (6, 9)]),
        (11, 5, [(0, 5), (5, 10), (10, 11)]),
        (7, 2, [(0, 2), (2, 4), (4, 6), (6, 7)]),
        (3, 5, [(0, 3)]),
        (5, 5, [(0, 5)]),
        (1, 1024, [(0, 1)]),
        (4, 1, [(0, 1), (1, 2), (2, 3), (3, 4)]),
    ],
)
def test_split_covers_every_document_in_calls_of_at_most_per_call(
    count: int, per_call: int, expected: list[tuple[int, int]]
) -> None:
    ranges = split(count, per_call)
    assert ranges == expected
    assert all(0 < stop - start <= per_call for start, stop in ranges)
    assert [i for start, stop in ranges for i in range(start, stop)] == list(range(count))


# --- merge ----------------------------------------------------------------------------------


def at(offset: int) -> range:
    """The positions of a part that starts at `offset` (a call's index i is offset + i)."""
    return range(offset, offset + 1000)


def test_one_part_keeps_the_upstream_order_exactly_even_if_not_sorted() -> None:
    upstream = [r(2, 0.1), r(0, 0.9), r(1, 0.5)]
    ranked = merge([(at(0), copy.deepcopy(upstream))], top_n=None, doc_ids=None)
    assert ranked == upstream


def test_one_part_keeps_extra_fields_such_as_documents() -> None:
    upstream = [{"index": 1, "relevance_score": 0.7, "document": {"text": "b"}}, r(0, 0.2)]
    assert merge([(at(0), upstream)], top_n=None, doc_ids=None) == upstream


def test_several_parts_are_shifted_by_their_offsets_and_merged_by_score() -> None:
    parts = [
        (at(0), [r(1, 0.9), r(0, 0.4), r(2, 0.05)]),
        (at(3), [r(0, 0.8), r(1, 0.3)]),
        (at(5), [r(0, 0.95)]),
    ]
    ranked = merge(parts, top_n=None, doc_ids=None)
    assert pairs(ranked) == [(5, 0.95), (1, 0.9), (3, 0.8), (0, 0.4), (4, 0.3), (2, 0.05)]


def test_merging_keeps_each_parts_own_order_for_equal_scores() -> None:
    parts = [
        (at(0), [r(1, 0.5), r(0, 0.5)]),
        (at(2), [r(1, 0.5), r(0, 0.2)]),
    ]
    ranked = merge(parts, top_n=None, doc_ids=None)
    # ties: the earlier part first, and within a part its own order
    assert [e["index"] for e in ranked] == [1, 0, 3, 2]


def test_merge_does_not_change_the_parts_it_is_given() -> None:
    parts = [(at(0), [r(0, 0.9)]), (at(1), [r(0, 0.8)])]
    before = copy.deepcopy(parts)
    merge(parts, top_n=1, doc_ids=["a", "b"])
    assert parts == before


@pytest.mark.parametrize("top_n", [1, 2, 3])
def test_top_n_keeps_the_best_after_merging(top_n: int) -> None:
    parts = [(at(0), [r(0, 0.6), r(1, 0.1)]), (at(2), [r(1, 0.7), r(0, 0.2)])]
    ranked = merge(parts, top_n=top_n, doc_ids=None)
    assert pairs(ranked) == [(3, 0.7), (0, 0.6), (2, 0.2)][:top_n]


def test_top_n_larger_than_the_results_keeps_them_all() -> None:
    ranked = merge([(at(0), [r(0, 0.6), r(1, 0.1)])], top_n=50, doc_ids=None)
    assert len(ranked) == 2


def test_top_n_truncates_a_single_part_too() -> None:
    ranked = merge([(at(0), [r(2, 0.3), r(0, 0.9), r(1, 0.5)])], top_n=2, doc_ids=None)
    assert pairs(ranked) == [(2, 0.3), (0, 0.9)]


def test_doc_ids_are_attached_by_the_submitted_index() -> None:
    parts = [(at(0), [r(1, 0.9), r(0, 0.1)]), (at(2), [r(0, 0.5), r(1, 0.4)])]
    ranked = merge(parts, top_n=None, doc_ids=["d0", "d1", None, "d3"])
    assert [(e["index"], e.get("id")) for e in ranked] == [
        (1, "d1"),
        (2, None),
        (3, "d3"),
        (0, "d0"),
    ]
    assert "id" not in ranked[1]


def test_no_ids_are_attached_without_doc_ids() -> None:
    ranked = merge([(at(0), [r(0, 0.5)]), (at(1), [r(0, 0.4)])], top_n=None, doc_ids=None)
    assert all("id" not in e for e in ranked)


def test_cache_hits_merge_with_fresh_scores_by_position() -> None:
    cached = cached_ranking({1: CachedScore(0.8, 2.0), 3: CachedScore(0.1, 2.0)})
    fresh = [r(1, 0.9), r(0, 0.3)]  # the call was sent documents 2 and 0, in that order
    ranked = merge([([2, 0], fresh), (at(0), cached)], top_n=3, doc_ids=None)
    assert pairs(ranked) == [(0, 0.9), (1, 0.8), (2, 0.3)]


# --- parse_api_keys -------------------------------------------------------------------------

SECRET_A = "sk-alpha-0123456789"
SECRET_B = "sk-beta-9876543210"


def test_keys_with_and_without_a_concurrency() -> None:
    keys = parse_api_keys(f"alpha={SECRET_A}@3, beta={SECRET_B}", 4)
    assert [(k.name, k.secret.get_secret_value(), k.max_concurrency) for k in keys] == [
        ("alpha", SECRET_A, 3),
        ("beta", SECRET_B, 4),
    ]


def test_the_default_concurrency_applies_to_keys_without_one() -> None:
    [key] = parse_api_keys(f"alpha={SECRET_A}", 7)
    assert key.max_concurrency == 7


@pytest.mark.parametrize(
    ("raw", "secret", "limit"),
    [
        ("alpha=sk@example", "sk@example", 4),
        ("alpha=sk@abc@5", "sk@abc", 5),
        ("alpha=sk@12a", "sk@12a", 4),
        ("alpha=sk-x=y", "sk-x=y", 4),
    ],
)
def test_a_secret_may_contain_at_signs_and_equals(raw: str, secret: str, limit: int) -> None:
    [key] = parse_api_keys(raw, 4)
    assert (key.name, key.secret.get_secret_value(), key.max_concurrency) == (
        "alpha",
        secret,
        limit,
    )


@pytest.mark.parametrize("raw", ["", " ", ",", " , ,"])
def test_an_empty_key_list_gives_no_keys(raw: str) -> None:
    assert parse_api_keys(raw, 4) == ()


def test_empty_entries_between_keys_are_ignored() -> None:
    keys = parse_api_keys(f"alpha={SECRET_A},,beta={SECRET_B},", 4)
    assert [k.name for k in keys] == ["alpha", "beta"]


def test_a_duplicate_name_is_a_config_error_without_the_secret() -> None:
    with pytest.raises(errors.ConfigError) as caught:
        parse_api_keys(f"alpha={SECRET_A},alpha={SECRET_B}@2", 4)
    message = str(caught.value)
    assert "'alpha'" in message
    assert "twice" in message
    assert SECRET_A not in message
    assert SECRET_B not in message


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (SECRET_A, "entry 1"),
        (f"alpha={SECRET_A},{SECRET_B}", "entry 2"),
        (f"={SECRET_A}", "entry 1"),
        ("alpha=", "entry 1"),
        (f"alpha={SECRET_A}@0", "'alpha'"),
    ],
    ids=["no-equals", "second-entry-no-name", "empty-name", "empty-secret", "zero-concurrency"],
)
def test_a_malformed_entry_is_a_config_error_without_the_secret(raw: str, fragment: str) -> None:
    with pytest.raises(errors.ConfigError) as caught:
        parse_api_keys(raw, 4)
    message = str(caught.value)
    assert fragment in message
    assert "RERANK_API_KEYS" in message
    assert SECRET_A not in message
    assert SECRET_B not in message


def test_the_repr_of_a_key_never_shows_the_secret() -> None:
    key = ApiKey(name="alpha", secret=SecretStr(SECRET_A), max_concurrency=3)
    for text in (repr(key), str(key), f"{key}", repr([key]), repr((key,))):
        assert SECRET_A not in text
        assert "alpha" in text


def test_the_repr_of_settings_never_shows_a_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("RERANK_")]:
        monkeypatch.delenv(name)
    settings = Settings(
        api_keys=f"alpha={SECRET_A}@2,beta={SECRET_B}",  # type: ignore[arg-type]
        _env_file=None,  # type: ignore[call-arg]
    )
    assert [k.name for k in settings.keys] == ["alpha", "beta"]  # cached on the instance now
    for text in (repr(settings), str(settings), repr(settings.keys), str(settings.model_dump())):
        assert SECRET_A not in text
        assert SECRET_B not in text
