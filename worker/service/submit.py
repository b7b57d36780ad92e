"""Submit a job: validate the whole input, store it in one transaction, publish its requests."""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import IO, Any

from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from worker import broker, catalog, constants, errors, ingest
from worker.db import repository
from worker.db.base import utcnow
from worker.db.models import JobStatus, RequestStatus
from worker.service import ending
from worker.service.scope import run_in_transaction, sessions
from worker.settings import Settings, get_settings
from worker.webhooks import targets

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
    on_complete_queue: str = constants.DEFAULT_ON_COMPLETE_QUEUE
    max_tokens: int | None = None
    max_cost: float | None = None

    def check(
        self, limits: ingest.Limits = ingest.DEFAULT_LIMITS, settings: Settings | None = None
    ) -> None:
        """InputError naming the option that cannot work; nothing is stored before this.
        `settings` say which webhook URLs are allowed (default: the process's settings)."""
        if self.priority not in constants.PRIORITIES:
            raise errors.InputError(
                f"must be one of {', '.join(constants.PRIORITIES)}", field="priority"
            )
        _check_number("top_n", self.top_n, constants.MAX_TOP_N)
        _check_number("max_tokens", self.max_tokens, constants.MAX_TOKENS_CAP)
        if self.max_cost is not None and not 0 < self.max_cost < constants.MAX_COST_CAP:
            raise errors.InputError(
                f"must be a positive number below {constants.MAX_COST_CAP:,}", field="max_cost"
            )
        if self.query is not None and not self.query.strip():
            raise errors.InputError("must not be empty", field="query")
        if self.model and not self.model.strip():
            raise errors.InputError("must not be blank", field="model")
        texts = {
            "query": (self.query, limits.max_query_chars),
            "model": (self.model, constants.MAX_MODEL_CHARS),
            "idempotency_key": (self.idempotency_key, constants.MAX_IDEMPOTENCY_KEY_CHARS),
            "webhook_url": (self.webhook_url, constants.MAX_WEBHOOK_URL_CHARS),
            "on_complete": (self.on_complete, constants.MAX_TASK_NAME_CHARS),
        }
        for name, (value, cap) in texts.items():
            if value is None:
                continue
            if len(value) > cap:
                raise errors.InputError(ingest.over_cap(len(value), "characters", cap), field=name)
            reason = ingest.unstorable(value)
            if reason:
                raise errors.InputError(reason, field=name)

        if self.webhook_url is not None:
            allow_private = (settings or get_settings()).webhook_allow_private
            targets.check_webhook_url(self.webhook_url, allow_private=allow_private)
        if self.on_complete is not None:
            targets.check_task_name(self.on_complete)
            targets.check_queue_name(self.on_complete_queue)

    def check_signable(self, tenant_id: int | None, settings: Settings) -> None:
        """A webhook is signed with its tenant's secret, or for a job of no tenant (the CLI's)
        with the deployment's RERANK_WEBHOOK_SECRET, which must then be set."""
        if self.webhook_url is not None and tenant_id is None and settings.webhook_secret is None:
            raise errors.InputError(
                "a job of no tenant is signed with RERANK_WEBHOOK_SECRET (whsec_ + base64), "
                "which is not set",
                field="webhook_url",
            )


def _check_number(name: str, value: int | None, cap: int) -> None:
    if value is None:
        return
    if value < 1:
        raise errors.InputError("must be a positive integer", field=name)
    if value > cap:
        raise errors.InputError(f"over the cap of {cap:,}", field=name)


def input_limits(settings: Settings) -> ingest.Limits:
    return ingest.Limits(
        max_line_bytes=settings.max_line_bytes,
        max_document_chars=settings.max_document_chars,
        max_documents_per_request=settings.max_documents_per_request,
        max_query_chars=settings.max_query_chars,
    )


def _stored_source(source: str) -> str:
    """The file name as a text column can hold it: a name that is not valid UTF-8 (an
    undecodable byte becomes a lone surrogate in Python) keeps its bytes as escapes."""
    safe = source.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")
    return safe[: constants.MAX_SOURCE_CHARS]


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
        "document_count": request.document_count,
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


def _batches(requests: Iterable[ingest.RequestInput]) -> Iterator[list[ingest.RequestInput]]:
    """The requests in batches of at most REQUEST_BATCH requests, DOCUMENT_BATCH documents
    and BATCH_CONTENT_CHARS characters of document JSON."""
    batch: list[ingest.RequestInput] = []
    documents = chars = 0
    for request in requests:
        batch.append(request)
        documents += len(request.documents)
        chars += sum(len(d.content) for d in request.documents)
        if (
            len(batch) >= REQUEST_BATCH
            or documents >= DOCUMENT_BATCH
            or chars >= BATCH_CONTENT_CHARS
        ):
            yield batch
            batch = []
            documents = chars = 0
    if batch:
        yield batch


def _store_batch(
    session: Session, job_id: str, batch: list[ingest.RequestInput], now: dt.datetime
) -> list[int]:
    """Insert requests and their documents (COPY on PostgreSQL); their ids, in order."""
    ids = repository.insert_requests(session, [_request_row(job_id, r, now) for r in batch])
    repository.insert_documents(
        session,
        (
            row
            for rid, r in zip(ids, batch, strict=True)
            for row in _document_rows(rid, r.documents)
        ),
    )
    return ids


@dataclass
class _ReadThrough:
    """A requests file read once and found valid, before anything is stored: its lines kept
    as read, to be parsed again as they are stored, and its totals."""

    lines: IO[bytes]
    requests: int
    documents: int
    warnings: list[str]


# The lines of a requests file are kept in memory up to this size, then in a temporary file.
SPOOL_MEMORY_BYTES = 16 * 1024 * 1024


def _kept(lines: Iterable[bytes | str], spool: IO[bytes]) -> Iterator[bytes | str]:
    """The lines, each also written to `spool` with a newline (as UTF-8 if given as text:
    a line UTF-8 cannot encode is refused by the validator, and the spool dropped)."""
    write = spool.write
    for line in lines:
        raw = line.encode("utf-8", "surrogatepass") if isinstance(line, str) else line
        write(raw if raw.endswith(b"\n") else raw + b"\n")
        yield line


def _read_through(
    lines: Iterable[bytes | str],
    model: str,
    top_n: int | None,
    limits: ingest.Limits,
    per_call_cap: int | None,
) -> _ReadThrough:
    """Validate every line (InputError at the first bad one, with nothing stored), keeping
    them; only validated, documents are not built, which halves the parse."""
    # Closed by the caller, which holds the _ReadThrough.
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY_BYTES)  # noqa: SIM115
    warnings: list[str] = []
    count = documents = 0
    try:
        requests = ingest.iter_requests(
            _kept(lines, spool),
            default_model=model,
            default_top_n=top_n,
            limits=limits,
            keep_documents=False,
        )
        for request in requests:
            warning = _split_warning(request, request.document_count, per_call_cap)
            if warning and len(warnings) < MAX_WARNINGS:
                warnings.append(warning)
            documents += request.document_count
            count += 1
        spool.seek(0)
    except BaseException:
        spool.close()
        raise
    return _ReadThrough(spool, count, documents, warnings)


def _store_corpus(
    session: Session,
    job_id: str,
    lines: Iterable[bytes],
    request: ingest.RequestInput,
    warnings: list[str],
    per_call_cap: int | None,
    limits: ingest.Limits,
) -> tuple[int, int]:
    """One request whose documents stream from the file into the database as they are
    validated (constant memory; on PostgreSQL one COPY, fed while the file is parsed); its
    id and its number of documents."""
    (request_id,) = repository.insert_requests(session, [_request_row(job_id, request, utcnow())])
    documents = _document_rows(request_id, ingest.iter_corpus(lines, limits=limits))
    count = repository.insert_documents(session, documents)
    repository.set_document_count(session, request_id, count)
    warning = _split_warning(request, count, per_call_cap)
    if warning:
        warnings.append(warning)
    return request_id, count


def submit_job(
    lines: Iterable[bytes],
    *,
    source: str,
    options: JobOptions | None = None,
    tenant_id: int | None = None,
    settings: Settings | None = None,
) -> SubmitResult:
    """Validate the whole input before anything is stored; then store and enqueue it.

    A bad line stores nothing: no job exists afterwards. A requests file is read through
    once to validate it; then its job and first batch commit and are enqueued at once, and a
    larger file's rest is stored batch by batch while that first batch runs (_store_rest).
    A repeated idempotency key (the tenant's own) answers the job it made.
    """
    settings = settings or get_settings()
    options = options or JobOptions()
    limits = input_limits(settings)
    options.check(limits, settings)
    options.check_signable(tenant_id, settings)
    model = options.model or settings.default_model
    cap = settings.max_documents_per_call
    maker = sessions(settings)
    if options.idempotency_key:
        with maker() as session:
            made = repository.find_job_by_idempotency_key(
                session, tenant_id, options.idempotency_key
            )
        if made is not None:
            return SubmitResult(made.id, made.total_requests, existing=True)
    if options.query is not None:
        return _submit_corpus(lines, source, options, tenant_id, model, limits, settings)

    read = _read_through(lines, model, options.top_n, limits, cap)
    with read.lines:
        batches = _batches(
            ingest.iter_requests(
                read.lines,
                default_model=model,
                default_top_n=options.top_n,
                # The first pass applied the line cap, to the lines as given (they were kept
                # with a newline each, and as UTF-8 where they came as text).
                limits=replace(limits, max_line_bytes=sys.maxsize),
            )
        )
        first = next(batches)
        more = len(first) < read.requests
        job_id = uuid.uuid4().hex
        row = {
            **_job_row(job_id, source, options, tenant_id),
            "total_requests": read.requests,
            "warnings": json.dumps(read.warnings) if read.warnings else None,
            "storing_until": _storing_lease_end(settings) if more else None,
        }
        with maker() as session:
            try:
                existing = _insert_job(session, row, options, tenant_id)
                if existing is not None:
                    return existing
                ids = _store_batch(session, job_id, first, utcnow())
                session.commit()
            except BaseException:
                session.rollback()
                raise
        result = SubmitResult(job_id, read.requests, warnings=read.warnings)
        # A job of one batch is analyzed before its requests are sent; a larger one once
        # its last batch is in, while its first ones already run.
        if not more:
            _refresh_statistics(read.requests, read.documents, maker)
        result.enqueued = enqueue_job(job_id, options.priority, settings, ids)
        if more:
            result.enqueued = _store_rest(
                job_id, batches, options.priority, result.enqueued, settings
            )
            _refresh_statistics(read.requests, read.documents, maker)
    return result


def _store_rest(
    job_id: str,
    batches: Iterable[list[ingest.RequestInput]],
    priority: str,
    enqueue: bool,
    settings: Settings,
) -> bool:
    """Store a job's requests after its first batch, one transaction per batch that also
    renews the job's storing lease, each batch enqueued once committed; then mark the job
    stored, completing it if its requests all ended meanwhile. Whether all were enqueued.

    A job that ended while it was being stored (cancelled) gets the rest of its requests
    stored as it would have had them: cancelled. Any failure (the database, an interrupt)
    fails the job with the reason, and propagates; a submit that dies outright leaves the
    lease to run out, and the sweeper fails the job.
    """
    maker = sessions(settings)
    stored = 0
    try:
        for batch in batches:
            with maker.begin() as session:
                is_open = repository.renew_storing(session, job_id, _storing_lease_end(settings))
                ids = _store_batch(session, job_id, batch, utcnow())
                if not is_open:
                    repository.cancel_queued_requests(session, job_id)
            stored += len(batch)
            if is_open and enqueue:
                enqueue = enqueue_job(job_id, priority, settings, ids)
        with maker.begin() as session:
            repository.end_storing(session, job_id)
            ending.complete_job_if_done(session, job_id)
    except BaseException as exc:
        where = f"storing stopped after the first batch and {stored:,} more requests"
        _fail_unstored(job_id, where, exc, settings)
        raise
    return enqueue


def _fail_unstored(job_id: str, where: str, exc: BaseException, settings: Settings) -> None:
    """Best effort: when the database itself failed, the storing lease runs out instead."""
    reason = f"{where} ({type(exc).__name__}); submit the file again"
    log.error("action=storing_failed job=%s reason=%s", job_id, type(exc).__name__)
    try:
        with sessions(settings).begin() as session:
            ending.fail_unstored_job(session, job_id, reason)
    except SQLAlchemyError as failed:
        log.warning("action=storing_failure_unrecorded reason=%s", type(failed).__name__)


def _storing_lease_end(settings: Settings) -> dt.datetime:
    return utcnow() + dt.timedelta(seconds=settings.storing_lease_s)


def _job_row(
    job_id: str, source: str, options: JobOptions, tenant_id: int | None
) -> dict[str, Any]:
    return {
        "id": job_id,
        "status": JobStatus.QUEUED,
        "priority": options.priority,
        "source": _stored_source(source),
        "tenant_id": tenant_id,
        "idempotency_key": options.idempotency_key,
        "use_cache": options.use_cache,
        "webhook_url": options.webhook_url,
        "on_complete": options.on_complete,
        "on_complete_queue": options.on_complete_queue if options.on_complete else None,
        "max_tokens": options.max_tokens,
        "max_cost": options.max_cost,
    }


def _insert_job(
    session: Session, row: dict[str, Any], options: JobOptions, tenant_id: int | None
) -> SubmitResult | None:
    """Insert the job's row; the existing job instead when the same idempotency key's
    submit at the same moment (another API process) stored its job first."""
    try:
        repository.insert_job(session, row)
    except IntegrityError:
        session.rollback()
        key = options.idempotency_key
        if key is None:
            raise
        existing = repository.find_job_by_idempotency_key(session, tenant_id, key)
        if existing is None:
            raise
        return SubmitResult(existing.id, existing.total_requests, existing=True)
    return None


def _submit_corpus(
    lines: Iterable[bytes],
    source: str,
    options: JobOptions,
    tenant_id: int | None,
    model: str,
    limits: ingest.Limits,
    settings: Settings,
) -> SubmitResult:
    """One request whose documents stream into one transaction: a corpus is one call's
    worth of work, which cannot start before its last document is stored."""
    assert options.query is not None
    maker = sessions(settings)
    job_id = uuid.uuid4().hex
    warnings: list[str] = []
    corpus = ingest.RequestInput(
        position=0,
        custom_id="corpus",
        query=options.query,
        model=model,
        top_n=options.top_n,
        return_documents=False,
    )
    with maker() as session:
        try:
            existing = _insert_job(
                session, _job_row(job_id, source, options, tenant_id), options, tenant_id
            )
            if existing is not None:
                return existing
            request_id, documents = _store_corpus(
                session, job_id, lines, corpus, warnings, settings.max_documents_per_call, limits
            )
            repository.set_job_totals(
                session, job_id, 1, json.dumps(warnings) if warnings else None
            )
            session.commit()
        except BaseException:
            session.rollback()
            raise
    _refresh_statistics(1, documents, maker)
    result = SubmitResult(job_id, 1, warnings=warnings)
    result.enqueued = enqueue_job(job_id, options.priority, settings, [request_id])
    return result


def _refresh_statistics(requests: int, documents: int, maker: sessionmaker[Session]) -> None:
    """Best effort: the job is stored, and stale statistics only make claims slower."""
    added = {"request": requests, "document": documents}
    try:
        with maker.begin() as session:
            repository.refresh_statistics(session, added)
    except SQLAlchemyError as exc:
        log.warning("action=analyze_skipped reason=%s", type(exc).__name__)


def enqueue_job(
    job_id: str, priority: str, settings: Settings, ids: list[int] | None = None
) -> bool:
    """Publish the job's queued requests (`ids` when the caller knows them all). False when
    the broker is down: the sweeper of any worker enqueues them once it is back, from SQL
    alone."""
    if ids is None:
        ids = run_in_transaction(
            lambda s: repository.request_ids(s, job_id, [RequestStatus.QUEUED]), settings
        )
    try:
        publish(ids, priority)
    except broker.BROKER_ERRORS as exc:
        log.warning("action=enqueue_deferred job=%s reason=%s", job_id, type(exc).__name__)
        return False
    return True


def publish(ids: list[int], priority: str) -> None:
    from worker.celery_app import app  # connects to the broker: only when there is work to send

    per_task = constants.REQUESTS_PER_TASK[priority]
    for start in range(0, len(ids), per_task):
        chunk = ids[start : start + per_task]
        # A short argsrepr (the args as Celery's logs show them): its default, a saferepr of
        # the ids, is a sixth of a send's time.
        shown = f"[{len(chunk)} requests from {chunk[0]}]"
        app.send_task(
            constants.RUN_REQUESTS_TASK,
            args=[chunk],
            queue=priority,
            retry=False,
            argsrepr=shown,
        )
