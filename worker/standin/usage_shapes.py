"""How each model's answers carry their usage, as 302.AI's rerank models do: a per-model
table of shapes, so clients are tested against every one."""

from __future__ import annotations

import math
from typing import Any

# Jina's own, and Voyage's.
USAGE_TOTAL = "usage"
# Cohere-style billed units, in tokens or in search units (a query and up to 100 documents).
BILLED_TOKENS = "billed_tokens"
SEARCH_UNITS = "search_units"
# meta.tokens / tokens: input and output tokens (BAAI and Youdao via 302.AI).
META_TOKENS = "meta_tokens"
TOKENS = "tokens"
# No usage at all: the call is billed, the answer does not say how much.
NONE = "none"
SHAPES = frozenset({USAGE_TOTAL, BILLED_TOKENS, SEARCH_UNITS, META_TOKENS, TOKENS, NONE})
DOCUMENTS_PER_SEARCH_UNIT = 100

# Models not named here answer Jina's shape.
DEFAULT_SHAPES: dict[str, str] = {
    "bge-reranker-v2-m3": META_TOKENS,
    "bce-reranker-base_v1": TOKENS,
    "Qwen3-Reranker-8B": BILLED_TOKENS,
    "Qwen3-Reranker-4B": BILLED_TOKENS,
    "Qwen3-Reranker-0.6B": BILLED_TOKENS,
    "rerank-2.5": USAGE_TOTAL,
    "rerank-2.5-lite": SEARCH_UNITS,
}


def search_units(documents: int) -> int:
    return math.ceil(documents / DOCUMENTS_PER_SEARCH_UNIT)


def usage_fields(shape: str, tokens: int, documents: int) -> dict[str, Any]:
    """The fields of a success answer that say what it billed, in `shape`."""
    if shape == USAGE_TOTAL:
        return {"usage": {"total_tokens": tokens}}
    if shape == BILLED_TOKENS:
        return {"meta": {"billed_units": {"input_tokens": tokens, "output_tokens": 0}}}
    if shape == SEARCH_UNITS:
        return {"meta": {"billed_units": {"search_units": search_units(documents)}}}
    if shape == META_TOKENS:
        return {"meta": {"tokens": {"input_tokens": tokens, "output_tokens": 0}}}
    if shape == TOKENS:
        return {"tokens": {"input_tokens": tokens, "output_tokens": 0}}
    return {}


def shape_of(model: str, overrides: dict[str, str]) -> str:
    return overrides.get(model) or DEFAULT_SHAPES.get(model, USAGE_TOTAL)
