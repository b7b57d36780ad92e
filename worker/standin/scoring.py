"""Deterministic relevance scores and Jina-like token counts, as pure functions.

A score is lexical, so that a ranking reads right to a person (the document that shares the
query's words comes first): a BM25-like sum over the query's words of the saturated count of
each in the document, normalised for the document's length. It looks only at the query and
that one document, as a pointwise model does, so scores from different calls compare, and
it is the same in every run and every process. A small hash of (query, document) breaks ties.
An image has no words but its URL's: it keeps a fixed low score unless they match.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

DEFAULT_IMAGE_TOKENS = 1000
_MAX_SCORE = 0.999999
# BM25's usual term-frequency saturation and length normalisation, around a short passage.
K1 = 1.2
B = 0.75
AVERAGE_WORDS = 12
# Share of the score range the words decide; the rest spreads equal matches apart.
LEXICAL_SHARE = 0.98
TIE_BREAK_SHARE = 1 - LEXICAL_SHARE
# An image whose URL shares no word with the query sits just above text that shares none.
IMAGE_BASE = 0.01
_WORD = re.compile(r"[^\W_]+")
_IMAGE_SUFFIXES = frozenset({"png", "jpg", "jpeg", "gif", "webp", "svg", "bmp", "tif", "tiff"})
STOPWORDS = frozenset(
    [
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "by",
        "can",
        "do",
        "does",
        "for",
        "from",
        "has",
        "have",
        "how",
        "i",
        "in",
        "is",
        "it",
        "its",
        "of",
        "on",
        "or",
        "s",
        "t",
        "that",
        "the",
        "their",
        "this",
        "to",
        "was",
        "we",
        "were",
        "what",
        "when",
        "where",
        "which",
        "who",
        "why",
        "will",
        "with",
        "you",
    ]
)

Document = str | dict[str, str]


def canonical_json(document: Document) -> str:
    """One spelling per document, so equal documents always hash alike."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def singular(word: str) -> str:
    """A plain English plural's singular (processes, queries, limits); others as they are."""
    if len(word) <= 3 or not word.endswith("s") or word.endswith("ss"):
        return word
    if word.endswith("ies"):
        return word[:-3] + "y"
    if word.endswith(("sses", "xes", "zes", "ches", "shes")):
        return word[:-2]
    return word[:-1]


def words(text: str) -> list[str]:
    """Lower-case words without stopwords, as singulars."""
    return [singular(w) for w in _WORD.findall(text.lower()) if w not in STOPWORDS]


def document_words(document: Document) -> list[str]:
    """A text's words; an image's are those of its URL's path (none for inline data)."""
    if isinstance(document, str):
        return words(document)
    if "image" not in document:
        return words(document.get("text", ""))
    image = document["image"]
    if not image.startswith(("http://", "https://")):
        return []
    return [w for w in words(urlsplit(image).path) if w not in _IMAGE_SUFFIXES]


def lexical_match(query_words: Sequence[str], found: Sequence[str]) -> float:
    """BM25-like: each distinct query word's saturated count in the document, averaged, so
    a document with all the query's words scores highest; in [0, K1 + 1)."""
    distinct = set(query_words)
    if not distinct or not found:
        return 0.0
    counts = Counter(found)
    norm = K1 * (1 - B + B * len(found) / AVERAGE_WORDS)
    total = sum(
        counts[word] * (K1 + 1) / (counts[word] + norm) for word in distinct if counts[word]
    )
    return total / len(distinct)


def _tie_break(query: str, document: Document) -> float:
    payload = f"{query}\x00{canonical_json(document)}".encode()
    return int.from_bytes(hashlib.sha256(payload).digest()[:8], "big") / 2**64


def _score(query: str, query_words: Sequence[str], document: Document) -> float:
    match = lexical_match(query_words, document_words(document))
    # 1 - exp(-x) keeps the order of matches and stays below 1.
    lexical = LEXICAL_SHARE * (1 - math.exp(-match))
    if match == 0 and isinstance(document, dict) and "image" in document:
        lexical = IMAGE_BASE
    return min(round(lexical + TIE_BREAK_SHARE * _tie_break(query, document), 6), _MAX_SCORE)


def relevance_score(query: str, document: Document) -> float:
    """A score in [0, 1): stable across runs, processes and servers."""
    return _score(query, words(query), document)


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
    query_words = words(query)
    scored = sorted(
        ((_score(query, query_words, doc), index) for index, doc in enumerate(documents)),
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
