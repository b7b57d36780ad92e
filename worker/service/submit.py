"""Submit a job: validate the whole input, store it in one transaction, publish its requests."""

from __future__ import annotations

import datetime as dt
import json
import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import kombu.exceptions
import redis
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from worker import catalog, constants, errors, ingest
from worker.db import repository
from worker.db.base import utcnow
from worker.db.models import Job, JobStatus, RequestStatus
from worker.service.scope import run_in_transaction, sessions
from worker.settings import Settings, get_settings

log = logging.getLogger(__name__)

# A requests file is stored in batches of at most this many requests, documents and
# characters of document JSON: the last bound keeps memory flat when documents are large
# (images), whatever their count.
REQUEST_BATCH = 500
DOCUMENT_BATCH = 5000
BATCH_CONTENT_CHARS = 8 * 1024 * 1024
MAX_WARNINGS = 20


@dataclass(frozen=True)
class JobOptions:
    """What a producer sets for a whole job besides its lines (the CLI's options, the API's
    query parameters)."""

    query: str | None = None
    model: str | None = None
    top_n: int | None = None
    priority: str = constants.QUEUE_BULK
    idempotency_key: str | None = None
    use_cache: bool = True
    webhook_url: str | None = None
    on_complete: str | None = None
    max_tokens: int | None = None
    max_cost: float | None = None

    def check(self) -> None:
        """InputError naming the option that cannot work; nothing is stored before this."""
        if self.priority not in constants.PRIORITIES:
            raise errors.InputError(
                f"must be one of {', '.join(constants.PRIORITIES)}", field="priority"
            )
        if self.top_n is not None and self.top_n < 1:
            raise errors.InputError("must be a positive integer", field="top_n")
        if self.query is not None and not self.query.strip():
            raise errors.InputError("must not be empty", field="query")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise errors.InputError("must be a positive integer", field="max_tokens")
        if self.max_cost is not None and not self.max_cost > 0:
            raise errors.InputError("must be a positive number", field="max_cost")


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
    options: JobOptions | None = None,
    tenant_id: int | None = None,
    settings: Settings | None = None,
) -> SubmitResult:
    """Validate the whole input and store it in one transaction; then enqueue it.

    A bad line rolls everything back: no job exists afterwards. A repeated idempotency key
    (the tenant's own) answers the job it made.
    """
    settings = settings or get_settings()
    options = options or JobOptions()
    options.check()
    model = options.model or settings.default_model
    maker = sessions(settings)
    with maker() as session:
        if options.idempotency_key:
            existing = repository.find_job_by_idempotency_key(
                session, tenant_id, options.idempotency_key
            )
            if existing is not None:
                return SubmitResult(existing.id, existing.total_requests, existing=True)
        job_id = uuid.uuid4().hex
        warnings: list[str] = []
        try:
            session.add(
                Job(
                    id=job_id,
                    status=JobStatus.QUEUED,
                    priority=options.priority,
                    source=source[:500],
                    tenant_id=tenant_id,
                    idempotency_key=options.idempotency_key,
                    use_cache=options.use_cache,
                    webhook_url=options.webhook_url,
                    on_complete=options.on_complete,
                    max_tokens=options.max_tokens,
                    max_cost=options.max_cost,
                )
            )
            try:
                session.flush()
            except IntegrityError:
                # The same key's submit at the same moment (another API process) stored
                # its job first: this one answers that job.
                session.rollback()
                key = options.idempotency_key
                if key is None:
                    raise
                existing = repository.find_job_by_idempotency_key(session, tenant_id, key)
                if existing is None:
                    raise
                return SubmitResult(existing.id, existing.total_requests, existing=True)
            cap = settings.max_documents_per_call
            if options.query is not None:
                corpus = ingest.RequestInput(
                    position=0,
                    custom_id="corpus",
                    query=options.query,
                    model=model,
                    top_n=options.top_n,
                    return_documents=False,
                )
                stored = _store_corpus(session, job_id, lines, corpus, warnings, cap)
            else:
                requests = ingest.iter_requests(
                    lines, default_model=model, default_top_n=options.top_n
                )
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
    result.enqueued = enqueue_job(job_id, options.priority, settings)
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
    ids = run_in_transaction(
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
