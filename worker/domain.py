"""Plain values passed between the database, the engine and the tasks."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import NamedTuple

from worker import constants


class CachedScore(NamedTuple):
    score: float
    tokens: float


@dataclass(frozen=True)
class RequestWork:
    """Everything needed to run one request, loaded from SQL by id."""

    request_id: int
    job_id: str
    query: str
    model: str
    top_n: int | None
    return_documents: bool
    documents_json: list[str]
    # Which delivery of the request this is (request.deliveries when it was claimed): only
    # the delivery holding the current lease may renew it or write the outcome.
    delivery: int
    doc_ids: list[str | None] | None = None
    priority: str = constants.QUEUE_BULK
    use_cache: bool = True
    # Filled when the score cache applies: each document's key, and the hits by position.
    cache_keys: list[bytes] | None = None
    cached: dict[int, CachedScore] = field(default_factory=dict)


@dataclass(frozen=True)
class CallRecord:
    """One HTTP attempt at the upstream, successful or not."""

    key_name: str
    model: str
    status_code: int | None
    outcome: str
    documents: int
    total_tokens: int
    latency_ms: float
    created_at: dt.datetime


@dataclass
class RequestOutcome:
    request_id: int
    job_id: str
    status: str
    delivery: int
    results_json: str | None = None
    total_tokens: int = 0
    error_type: str | None = None
    error_message: str | None = None
    calls: list[CallRecord] = field(default_factory=list)
    cache_hits: int = 0
    tokens_saved: int = 0
    # (key, score, tokens) of every pair scored by a call, for the score cache.
    new_scores: list[tuple[bytes, float, float]] = field(default_factory=list)
