"""Tokens a call will bill, guessed before it is made, and what the answers taught about the guess.

The upstream counts tokens its own way (and does not say how), so the guess is simple on
purpose: about four characters a token for text, a fixed figure for an image, the query
counted once per document (rerankers score each pair). The answers' usage corrects it: the
ratio billed / estimated is learnt per model, as an EWMA kept in Redis and shared by every
worker (updated where a call's slot is settled, see `worker.upstream.limits`).

`estimate_tokens` x `learnt_ratio` is what a call of the model is expected to bill; `estimate`
uses it for a file's cost and time, and the limiter reserves it in a key's token window.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import redis

from worker import constants

CHARS_PER_TOKEN = 4
# A search unit (Cohere's, Voyage's billing) is one query with up to this many documents.
DOCUMENTS_PER_SEARCH_UNIT = 100
IMAGE_TOKENS = 800
# A stored document is compact JSON: an image is the only one that starts so.
_IMAGE_PREFIX = '{"image":'


def estimate_tokens(model: str, documents_json: Sequence[str], query: str) -> int:
    """Tokens one call with these documents (as stored, compact JSON) should bill, before
    any learning. The model is kept for a per-model count; today all count alike."""
    images = 0
    chars = 0
    for document in documents_json:
        if document.startswith(_IMAGE_PREFIX):
            images += 1
        else:
            chars += len(document)
    query_tokens = len(query) // CHARS_PER_TOKEN + 1
    return len(documents_json) * query_tokens + chars // CHARS_PER_TOKEN + images * IMAGE_TOKENS


def learnt_ratio(
    client: redis.Redis, model: str, prefix: str = constants.REDIS_PREFIX
) -> float | None:
    """Billed / estimated tokens of the model so far, or None before its first answer."""
    key = constants.TOKEN_RATIO_KEY.replace(constants.REDIS_PREFIX, prefix, 1)
    raw: Any = client.hget(key, model)
    return float(raw) if raw is not None else None


def expected_tokens(estimate: int, ratio: float | None) -> int:
    """What a call estimated at `estimate` tokens should bill, given the learnt ratio."""
    return round(estimate * (ratio if ratio is not None else 1.0))


def estimate_search_units(documents: int) -> int:
    return math.ceil(documents / DOCUMENTS_PER_SEARCH_UNIT)
