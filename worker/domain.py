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
class JobBudget:
    """A job's caps, the prices that turn a call into cost, and what SQL says it billed so
    far (which seeds the job's spend in Redis when Redis has none)."""

    max_tokens: int | None
    max_cost: float | None
    price_per_million_tokens: float | None
    price_per_search_unit: float | None
    spent_tokens: int = 0
    spent_cost: float = 0.0

    @property
    def priced(self) -> bool:
        return self.price_per_million_tokens is not None or self.price_per_search_unit is not None

    def cost(self, tokens: float, search_units: float) -> float:
        return (tokens * (self.price_per_million_tokens or 0.0) / 1_000_000) + (
            search_units * (self.price_per_search_unit or 0.0)
        )


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
    # Only for a job with a cap: the engine reserves each call against it (None costs nothing).
    budget: JobBudget | None = None
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
    search_units: int = 0
    usage_unknown: bool = False


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


@dataclass(frozen=True)
class OneRequestOutcome:
    """What a one-request job (a synchronous rerank) ended with: its request's answer."""

    status: str
    model: str
    results_json: str | None
    total_tokens: int
    error_type: str | None
    error_message: str | None
    billed_calls: int
