"""What rerank-worker knows about each upstream model: endpoint, call size, scoring, price."""

from __future__ import annotations

from dataclasses import dataclass

JINA_PATH = "/jina/v1/rerank"
GENERIC_PATH = "/v1/rerank"
# Conservative cap on documents per upstream call where a model's own is not published.
DEFAULT_MAX_DOCUMENTS = 1024
VOYAGE_MAX_DOCUMENTS = 1000


@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: str
    max_documents: int = DEFAULT_MAX_DOCUMENTS
    # Pointwise models score each (query, document) pair on its own, so scores from
    # separate calls of a split request are comparable; listwise ones are not.
    pointwise: bool = True
    accepts_images: bool = False


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("jina-reranker-m0", JINA_PATH, accepts_images=True),
        ModelSpec("jina-reranker-v2-base-multilingual", JINA_PATH),
        ModelSpec("jina-reranker-v1-base-en", JINA_PATH),
        ModelSpec("jina-reranker-v1-turbo-en", JINA_PATH),
        ModelSpec("jina-reranker-v1-tiny-en", JINA_PATH),
        ModelSpec("jina-reranker-v3", JINA_PATH, pointwise=False),
        ModelSpec("bge-reranker-v2-m3", GENERIC_PATH),
        ModelSpec("bce-reranker-base_v1", GENERIC_PATH),
        # Qwen3's rerankers judge each pair on its own; Voyage's take 1,000 documents a call.
        ModelSpec("Qwen3-Reranker-8B", GENERIC_PATH),
        ModelSpec("Qwen3-Reranker-4B", GENERIC_PATH),
        ModelSpec("Qwen3-Reranker-0.6B", GENERIC_PATH),
        ModelSpec("rerank-2.5", GENERIC_PATH, max_documents=VOYAGE_MAX_DOCUMENTS),
        ModelSpec("rerank-2.5-lite", GENERIC_PATH, max_documents=VOYAGE_MAX_DOCUMENTS),
    )
}


def model_spec(name: str) -> ModelSpec:
    """The spec of a model; an unknown one is sent to the generic endpoint as it is."""
    return MODELS.get(name) or ModelSpec(name, GENERIC_PATH)


def max_documents_per_call(model: str, configured: int | None) -> int:
    cap = model_spec(model).max_documents
    return min(configured, cap) if configured else cap
