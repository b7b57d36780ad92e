"""Deterministic fake relevance scores and Jina-like token counts, as pure functions."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

DEFAULT_IMAGE_TOKENS = 1000
_MAX_SCORE = 0.999999

Document = str | dict[str, str]


def canonical_json(document: Document) -> str:
    """One spelling per document, so equal documents always hash alike."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def relevance_score(query: str, document: Document) -> float:
    """Hash-derived score in [0, 1): stable across runs, processes and servers."""
    payload = f"{query}\x00{canonical_json(document)}".encode()
    fraction = int.from_bytes(hashlib.sha256(payload).digest()[:8], "big") / 2**64
    return min(round(fraction, 6), _MAX_SCORE)


def text_tokens(text: str) -> int:
    """Roughly 4 UTF-8 bytes per token, and never free."""
    return max(1, -(-len(text.encode()) // 4))


def count_tokens(query: str, document: Document, image_tokens: int = DEFAULT_IMAGE_TOKENS) -> int:
    """Tokens billed for scoring one document against the query."""
    return text_tokens(query) + _document_tokens(document, image_tokens)


def rank(
    query: str,
    documents: Sequence[Document],
    top_n: int | None = None,
    return_documents: bool = True,
    image_tokens: int = DEFAULT_IMAGE_TOKENS,
) -> tuple[list[dict[str, Any]], int]:
    """Results best first (ties by index) cut to top_n, and the total tokens billed."""
    scored = sorted(
        ((relevance_score(query, doc), index) for index, doc in enumerate(documents)),
        key=lambda pair: (-pair[0], pair[1]),
    )
    kept = scored if top_n is None else scored[:top_n]
    results = [_result(index, score, documents[index], return_documents) for score, index in kept]
    total_tokens = sum(count_tokens(query, doc, image_tokens) for doc in documents)
    return results, total_tokens


def _document_tokens(document: Document, image_tokens: int) -> int:
    if isinstance(document, str):
        return text_tokens(document)
    if "image" in document:
        return image_tokens
    return text_tokens(document["text"])


def _result(index: int, score: float, document: Document, with_document: bool) -> dict[str, Any]:
    result: dict[str, Any] = {"index": index, "relevance_score": score}
    if with_document:
        result["document"] = {"text": document} if isinstance(document, str) else document
    return result
