"""The use cases: submit a job, run requests, read status, results and usage, cancel, sweep."""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import IO, Any, TypeVar

import kombu.exceptions
import redis
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from worker import cache, catalog, constants, errors, ingest
from worker.db import repository
from worker.db.base import utcnow
from worker.db.models import Job, JobStatus, RequestStatus
from worker.db.session import get_sessionmaker, in_transaction
from worker.domain import RequestWork
from worker.redis_clients import redis_url, sync_redis
from worker.settings import Settings, get_settings

log = logging.getLogger(__name__)
T = TypeVar("T")

# A requests file is stored in batches of at most this many requests, documents and
# characters of document JSON: the last bound keeps memory flat when documents are large
# (images), whatever their count.
REQUEST_BATCH = 500
DOCUMENT_BATCH = 5000
BATCH_CONTENT_CHARS = 8 * 1024 * 1024
MAX_WARNINGS = 20


def sessions(settings: Settings | None = None) -> sessionmaker[Session]:
    return get_sessionmaker((settings or get_settings()).sqlalchemy_url())


def _in_transaction(fn: Callable[[Session], T], settings: Settings | None = None) -> T:
    return in_transaction((settings or get_settings()).sqlalchemy_url(), fn)


# ---------------------------------------------------------------- submit


@dataclass(frozen=True)
class _Stored:
    """How many rows of each kind a submit stored."""

    requests: int
    documents: int


@dataclass
class SubmitResult:
    job_id: str
    total_requests: int
    existing: bool = False
    enqueued: bool = True
    warnings: list[str] = field(default_factory=list)


def _split_warning(
    request: ingest.RequestInput, documents: int, per_call_cap: int | None
) -> str | None:
    per_call = catalog.max_documents_per_call(request.model, per_call_cap)
    if catalog.model_spec(request.model).pointwise or documents <= per_call:
        return None
    return (
        f"request '{request.custom_id}': model {request.model} ranks all documents of a call "
        f"together; split into calls of {per_call}, its scores are not comparable across calls"
    )


def _request_row(
    job_id: str, request: ingest.RequestInput, enqueued_at: dt.datetime
) -> dict[str, Any]:
    return {
        "job_id": job_id,
        "position": request.position,
        "custom_id": request.custom_id,
        "query": request.query,
        "model": request.model,
        "top_n": request.top_n,
        "return_documents": request.return_documents,
        "document_count": len(request.documents),
        "status": RequestStatus.QUEUED,
        "deliveries": 0,
        "total_tokens": 0,
        "enqueued_at": enqueued_at,
    }


def _document_rows(
    request_id: int, documents: Iterable[ingest.DocumentInput]
) -> Iterable[repository.DocumentRow]:
    """Rows made as they are consumed, so a COPY can stream them from the input file."""
    return ((request_id, position, d.content, d.doc_id) for position, d in enumerate(documents))


def _store_requests(
    session: Session,
    job_id: str,
    requests: Iterable[ingest.RequestInput],
    warnings: list[str],
    per_call_cap: int | None,
) -> _Stored:
    """Insert requests and their documents in batches (COPY on PostgreSQL)."""
    now = utcnow()
    count = documents = 0
    batch: list[ingest.RequestInput] = []
    batch_documents = batch_chars = 0

    def flush() -> None:
        ids = repository.insert_requests(session, [_request_row(job_id, r, now) for r in batch])
        repository.insert_documents(
            session,
            (
                row
                for rid, r in zip(ids, batch, strict=True)
                for row in _document_rows(rid, r.documents)
            ),
        )
        batch.clear()

    for request in requests:
        warning = _split_warning(request, len(request.documents), per_call_cap)
        if warning and len(warnings) < MAX_WARNINGS:
            warnings.append(warning)
        batch.append(request)
        batch_documents += len(request.documents)
        batch_chars += sum(len(d.content) for d in request.documents)
        documents += len(request.documents)
        count += 1
        if (
            len(batch) >= REQUEST_BATCH
            or batch_documents >= DOCUMENT_BATCH
            or batch_chars >= BATCH_CONTENT_CHARS
        ):
            flush()
            batch_documents = batch_chars = 0
    if batch:
        flush()
    return _Stored(count, documents)


def _store_corpus(
    session: Session,
    job_id: str,
    lines: Iterable[bytes],
    request: ingest.RequestInput,
    warnings: list[str],
    per_call_cap: int | None,
) -> _Stored:
    """One request whose documents stream from the file into the database as they are
    validated (constant memory; on PostgreSQL one COPY, fed while the file is parsed)."""
    (request_id,) = repository.insert_requests(session, [_request_row(job_id, request, utcnow())])
    documents = _document_rows(request_id, ingest.iter_corpus(lines))
    count = repository.insert_documents(session, documents)
    repository.set_document_count(session, request_id, count)
    warning = _split_warning(request, count, per_call_cap)
    if warning:
        warnings.append(warning)
    return _Stored(1, count)


def submit_job(
    lines: Iterable[bytes],
    *,
    source: str,
    query: str | None = None,
    model: str | None = None,
    top_n: int | None = None,
    priority: str = constants.QUEUE_BULK,
    idempotency_key: str | None = None,
    use_cache: bool = True,
    settings: Settings | None = None,
) -> SubmitResult:
    """Validate the whole input and store it in one transaction; then enqueue it.

    A bad line rolls everything back: no job exists afterwards.
    """
    settings = settings or get_settings()
    if priority not in constants.PRIORITIES:
        raise errors.InputError(f"priority must be one of {', '.join(constants.PRIORITIES)}")
    if top_n is not None and top_n < 1:
        raise errors.InputError("--top-n must be a positive integer")
    model = model or settings.default_model
    maker = sessions(settings)
    with maker() as session:
        if idempotency_key:
            existing = repository.find_job_by_idempotency_key(session, idempotency_key)
            if existing is not None:
                return SubmitResult(existing.id, existing.total_requests, existing=True)
        job_id = uuid.uuid4().hex
        warnings: list[str] = []
        try:
            session.add(
                Job(
                    id=job_id,
                    status=JobStatus.QUEUED,
                    priority=priority,
                    source=source[:500],
                    idempotency_key=idempotency_key,
                    use_cache=use_cache,
                )
            )
            session.flush()
            cap = settings.max_documents_per_call
            if query is not None:
                if not query.strip():
                    raise errors.InputError("--query must not be empty")
                corpus = ingest.RequestInput(
                    position=0,
                    custom_id="corpus",
                    query=query,
                    model=model,
                    top_n=top_n,
                    return_documents=False,
                )
                stored = _store_corpus(session, job_id, lines, corpus, warnings, cap)
            else:
                requests = ingest.iter_requests(lines, default_model=model, default_top_n=top_n)
                stored = _store_requests(session, job_id, requests, warnings, cap)
            job = session.get(Job, job_id)
            assert job is not None
            job.total_requests = stored.requests
            job.warnings = json.dumps(warnings) if warnings else None
            session.commit()
        except BaseException:
            session.rollback()
            raise
    _refresh_statistics(stored, maker)
    result = SubmitResult(job_id, stored.requests, warnings=warnings)
    result.enqueued = enqueue_job(job_id, priority, settings)
    return result


def _refresh_statistics(stored: _Stored, maker: sessionmaker[Session]) -> None:
    """Best effort: the job is stored, and stale statistics only make claims slower."""
    added = {"request": stored.requests, "document": stored.documents}
    try:
        with maker.begin() as session:
            repository.refresh_statistics(session, added)
    except SQLAlchemyError as exc:
        log.warning("action=analyze_skipped reason=%s", type(exc).__name__)


def enqueue_job(job_id: str, priority: str, settings: Settings) -> bool:
    """Publish the job's queued requests. False when the broker is down: the sweeper of
    any worker enqueues them once it is back, from SQL alone."""
    ids = _in_transaction(
        lambda s: repository.request_ids(s, job_id, [RequestStatus.QUEUED]), settings
    )
    try:
        publish(ids, priority)
    except (kombu.exceptions.OperationalError, redis.exceptions.ConnectionError, OSError) as exc:
        log.warning("action=enqueue_deferred job=%s reason=%s", job_id, type(exc).__name__)
        return False
    return True


def publish(ids: list[int], priority: str) -> None:
    from worker.celery_app import app  # connects to Redis: only when there is work to send

    per_task = constants.REQUESTS_PER_TASK[priority]
    for start in range(0, len(ids), per_task):
        chunk = ids[start : start + per_task]
        app.send_task(constants.RUN_REQUESTS_TASK, args=[chunk], queue=priority, retry=False)


# ---------------------------------------------------------------- run


def run_requests(request_ids: list[int]) -> int:
    """Claim the requests in SQL and hand them to this process's pipeline."""
    from worker.pipeline import get_pipeline  # the engine and HTTP stack: workers only

    settings = get_settings()
    work = _in_transaction(functools.partial(_claim, ids=request_ids, settings=settings))
    if work:
        get_pipeline(settings).run(work)
    return len(work)


def _claim(session: Session, ids: list[int], settings: Settings) -> list[RequestWork]:
    """One transaction per task: claim, end the jobs of poison requests, look up the cache."""
    work, poison = repository.claim_requests(
        session, ids, lease_s=settings.request_lease_s, max_deliveries=constants.MAX_DELIVERIES
    )
    if poison:
        log.error("action=poison_request ids=%s", poison)
        repository.complete_jobs_of_requests(session, poison)
    return _with_cache_hits(session, work)


def _with_cache_hits(session: Session, work: list[RequestWork]) -> list[RequestWork]:
    """Look up the cacheable requests' pairs, all in one query."""
    keys = {w.request_id: cache.keys_of(w) for w in work if cache.applies(w)}
    if not keys:
        return work
    every_key = [key for request_keys in keys.values() for key in request_keys]
    found = repository.cached_scores(session, every_key)
    return [
        cache.with_hits(w, keys[w.request_id], found) if w.request_id in keys else w for w in work
    ]


# ---------------------------------------------------------------- read


def job_progress(job_id: str, settings: Settings | None = None) -> dict[str, Any]:
    """The job and its request counts: what a poller needs, without usage's aggregates."""
    with sessions(settings)() as session:
        return _progress(session, job_id)


def _progress(session: Session, job_id: str) -> dict[str, Any]:
    job = repository.get_job(session, job_id)
    if job is None:
        raise errors.JobNotFound(f"no job with id '{job_id}'")
    counts = repository.job_counts(session, job_id)
    return {
        **job_summary(job),
        "total": counts.total,
        "succeeded": counts.succeeded,
        "failed": counts.failed,
        "cancelled": counts.cancelled,
        "pending": counts.pending,
        "warnings": repository.job_warnings(job),
    }


def job_status(job_id: str, settings: Settings | None = None) -> dict[str, Any]:
    """The job's progress with its usage and score-cache savings so far."""
    with sessions(settings)() as session:
        progress = _progress(session, job_id)
        rows = repository.usage(session, job_id)
        savings = repository.cache_savings(session, job_id)
    return {**progress, "usage": usage_totals(rows), "cache": cache_totals(savings)}


def job_summary(job: Job) -> dict[str, Any]:
    def iso(value: dt.datetime | None) -> str | None:
        return value.isoformat() if value else None

    return {
        "id": job.id,
        "status": job.status,
        "priority": job.priority,
        "source": job.source,
        "total_requests": job.total_requests,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
    }


def list_jobs(
    status: str | None, limit: int, settings: Settings | None = None
) -> list[dict[str, Any]]:
    with sessions(settings)() as session:
        return [job_summary(j) for j in repository.list_jobs(session, status=status, limit=limit)]


def usage_totals(rows: list[repository.UsageRow]) -> dict[str, Any]:
    costs = [r.cost for r in rows if r.cost is not None]
    return {
        "total_tokens": sum(r.total_tokens for r in rows),
        "calls": sum(r.calls for r in rows),
        "billed_calls": sum(r.billed_calls for r in rows),
        "cost": round(sum(costs), 9) if costs else 0.0,
    }


def cache_totals(rows: list[repository.CacheSavings]) -> dict[str, Any]:
    documents = sum(r.documents for r in rows)
    hits = sum(r.hits for r in rows)
    costs = [r.cost_saved for r in rows if r.cost_saved is not None]
    return {
        "hits": hits,
        "hit_rate": round(hits / documents, 4) if documents else 0.0,
        "tokens_saved": sum(r.tokens_saved for r in rows),
        "cost_saved": round(sum(costs), 9) if costs else 0.0,
    }


def usage_report(job_id: str | None, settings: Settings | None = None) -> dict[str, Any]:
    with sessions(settings)() as session:
        if job_id and repository.get_job(session, job_id) is None:
            raise errors.JobNotFound(f"no job with id '{job_id}'")
        rows = repository.usage(session, job_id)
        savings = repository.cache_savings(session, job_id)
    return {
        **usage_totals(rows),
        "job": job_id,
        "cache": {
            **cache_totals(savings),
            "by_model": [
                {
                    "model": r.model,
                    "documents": r.documents,
                    "hits": r.hits,
                    "tokens_saved": r.tokens_saved,
                    "cost_saved": r.cost_saved,
                    "currency": r.currency,
                }
                for r in savings
            ],
        },
        "by_key_and_model": [
            {
                "key": r.key_name,
                "model": r.model,
                "calls": r.calls,
                "billed_calls": r.billed_calls,
                "total_tokens": r.total_tokens,
                "cost": r.cost,
                "currency": r.currency,
            }
            for r in rows
        ],
    }


_STATUS_OUT = {RequestStatus.SUCCEEDED: "succeeded", RequestStatus.FAILED: "failed"}


def result_line(
    custom_id: str,
    status: str,
    results_json: str | None,
    total_tokens: int,
    error_type: str | None,
    error_message: str | None,
) -> str:
    """One JSON line of `results`; the stored results text is spliced in as it is."""
    if status == RequestStatus.SUCCEEDED:
        error = "null"
    elif status in (RequestStatus.QUEUED, RequestStatus.RUNNING):
        status, error = "pending", "null"
    else:
        error = json.dumps({"type": error_type or status, "message": error_message or status})
        status = "failed"
    return (
        f'{{"custom_id":{json.dumps(custom_id, ensure_ascii=False)},"status":"{status}",'
        f'"results":{results_json or "[]"},"usage":{{"total_tokens":{total_tokens}}},'
        f'"error":{error}}}'
    )


def write_results(job_id: str, out: IO[str], settings: Settings | None = None) -> int:
    """Write the job's result lines to `out`, one write per batch of rows; returns the count."""
    count = 0
    with sessions(settings)() as session:
        if repository.get_job(session, job_id) is None:
            raise errors.JobNotFound(f"no job with id '{job_id}'")
        for rows in repository.iter_results(session, job_id):
            out.write("".join([result_line(*row) + "\n" for row in rows]))
            count += len(rows)
    return count


# ---------------------------------------------------------------- cancel


def cancel_job(job_id: str, settings: Settings | None = None) -> bool:
    """No new upstream call for the job from now on: SQL for queued requests, a Redis mark
    that the slot script checks before every call for those already running."""
    settings = settings or get_settings()
    with sessions(settings).begin() as session:
        if repository.get_job(session, job_id) is None:
            raise errors.JobNotFound(f"no job with id '{job_id}'")
        changed = repository.cancel_job(session, job_id)
    if changed:
        mark = constants.CANCELLED_JOB_KEY.format(job_id=job_id)
        sync_redis(redis_url(settings)).set(mark, "1", ex=constants.CANCEL_MARK_TTL_S)
    return changed
