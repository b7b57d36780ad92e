"""How many tokens a call is expected to bill, before it is made (budgets, `estimate`).

One place for the guess, so a better one (a ratio learnt from answers' usage) replaces it
here for every caller.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

# About four UTF-8 bytes of text per token; an image counts as a fixed figure (Jina's).
BYTES_PER_TOKEN = 4
IMAGE_TOKENS = 1000
IMAGE_PREFIX = '{"image"'
# A search unit (Cohere's, Voyage's billing) is one query with up to this many documents.
DOCUMENTS_PER_SEARCH_UNIT = 100


def _text_tokens(text_bytes: int) -> int:
    return max(1, math.ceil(text_bytes / BYTES_PER_TOKEN))


def estimate_tokens(model: str, query: str, documents_json: Iterable[str]) -> int:
    """Tokens for ranking the documents (their stored JSON text) against the query: the
    query is counted with each document, as rerank APIs bill it. `model` is for a per-model
    ratio; the plain guess does not use it."""
    query_tokens = _text_tokens(len(query.encode()))
    total = 0
    for document in documents_json:
        if document.startswith(IMAGE_PREFIX):
            total += query_tokens + IMAGE_TOKENS
        else:
            total += query_tokens + _text_tokens(len(document.encode()))
    return total


def estimate_search_units(documents: int) -> int:
    return math.ceil(documents / DOCUMENTS_PER_SEARCH_UNIT)
