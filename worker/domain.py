"""Plain values passed between the database, the engine and the tasks."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field


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
    doc_ids: list[str | None] | None = None


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
    results_json: str | None = None
    total_tokens: int = 0
    error_type: str | None = None
    error_message: str | None = None
    calls: list[CallRecord] = field(default_factory=list)
