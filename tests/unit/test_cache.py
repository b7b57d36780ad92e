"""Score-cache keys and hits: pure logic."""

from __future__ import annotations

import pytest

from worker import cache
from worker.domain import CachedScore, RequestWork


def work(model: str = "jina-reranker-m0", use_cache: bool = True) -> RequestWork:
    return RequestWork(
        request_id=1,
        job_id="j",
        query="q",
        model=model,
        top_n=None,
        return_documents=False,
        documents_json=['"a"', '{"text":"b"}', '"a"'],
        delivery=1,
        use_cache=use_cache,
    )


def test_keys_differ_by_model_query_and_document() -> None:
    base = cache.pair_key("m", "q", '"d"')
    assert len(base) == cache.KEY_BYTES
    assert base == cache.pair_key("m", "q", '"d"')
    assert len({base, cache.pair_key("m2", "q", '"d"'), cache.pair_key("m", "q2", '"d"'),
                cache.pair_key("m", "q", '"e"')}) == 4  # fmt: skip


def test_keys_cannot_be_forged_by_moving_text_between_fields() -> None:
    """Length-prefixed parts: ("ab", "c") and ("a", "bc") are different pairs."""
    assert cache.pair_key("m", "ab", "c") != cache.pair_key("m", "a", "bc")


@pytest.mark.parametrize(
    ("model", "use_cache", "expected"),
    [
        ("jina-reranker-m0", True, True),
        ("jina-reranker-m0", False, False),
        ("jina-reranker-v3", True, False),  # listwise: scores depend on the call
    ],
)
def test_the_cache_applies_to_pointwise_models_of_jobs_that_want_it(
    model: str, use_cache: bool, expected: bool
) -> None:
    assert cache.applies(work(model, use_cache)) is expected


def test_hits_are_found_by_position_also_for_repeated_documents() -> None:
    item = work()
    keys = cache.keys_of(item)
    assert keys[0] == keys[2] != keys[1]
    found = {keys[0]: CachedScore(0.5, 3.0)}
    with_hits = cache.with_hits(item, keys, found)
    assert with_hits.cached == {0: CachedScore(0.5, 3.0), 2: CachedScore(0.5, 3.0)}
    assert with_hits.cache_keys == keys
