"""Every query rerank-worker makes."""

from __future__ import annotations

import datetime as dt
import itertools
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    CursorResult,
    Result,
    Table,
    bindparam,
    case,
    func,
    insert,
    literal_column,
    null,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from worker.cache import KEY_BYTES
from worker.db.base import utcnow
from worker.db.models import (
    JOB_ENDED,
    REQUEST_PENDING,
    Document,
    Job,
    JobStatus,
    ModelPrice,
    RedisEpoch,
    Request,
    RequestStatus,
    ScoreCache,
    UpstreamCall,
)
from worker.domain import CachedScore, RequestOutcome, RequestWork

# Core tables, for bulk statements that skip the ORM's per-row work.
JOB_TABLE = cast(Table, Job.__table__)
REQUEST_TABLE = cast(Table, Request.__table__)
DOCUMENT_TABLE = cast(Table, Document.__table__)
UPSTREAM_CALL_TABLE = cast(Table, UpstreamCall.__table__)
SCORE_CACHE_TABLE = cast(Table, ScoreCache.__table__)
# Keys per lookup statement on SQLite (bound parameters stay well under its limit).
CACHE_LOOKUP_BATCH = 1000
# On PostgreSQL a whole batch is one statement. psycopg adapts a list's items one by one
# in Python (about 8 us per bytea on a slow core), so the fixed-size keys travel as one
# bytea, cut apart by the server, and the floats as one array literal.
PG_PACKED_KEYS = (
    f"SELECT substring(CAST(:keys AS bytea) FROM i * {KEY_BYTES} + 1 FOR {KEY_BYTES}) "
    f"FROM generate_series(0, length(CAST(:keys AS bytea)) / {KEY_BYTES} - 1) AS i"
)
PG_CACHE_LOOKUP = text(
    f"SELECT key, score, tokens FROM score_cache WHERE key = ANY(ARRAY({PG_PACKED_KEYS}))"
)
PG_CACHE_STORE = text(
    "INSERT INTO score_cache (key, score, tokens) "
    f"SELECT substring(CAST(:keys AS bytea) FROM (CAST(n AS int) - 1) * {KEY_BYTES} + 1 "
    f"FOR {KEY_BYTES}), score, tokens FROM unnest(CAST(:scores AS float8[]), CAST(:tokens AS float8[])) "
    "WITH ORDINALITY AS entry(score, tokens, n) ON CONFLICT DO NOTHING"
)


def _on_postgresql(session: Session) -> bool:
    """PostgreSQL gets COPY and packed parameters; other databases get plain statements."""
    return session.get_bind().dialect.name == "postgresql"


def _rowcount(result: Result[Any]) -> int:
    return int(cast(CursorResult[Any], result).rowcount)


@dataclass(frozen=True)
class JobCounts:
    total: int
    succeeded: int
    failed: int
    cancelled: int
    pending: int


@dataclass(frozen=True)
class UsageRow:
    key_name: str
    model: str
    calls: int
    billed_calls: int
    total_tokens: int
    cost: float | None
    currency: str | None


def find_job_by_idempotency_key(session: Session, tenant_id: int | None, key: str) -> Job | None:
    """The job of this tenant's (or, with None, the CLI's) idempotency key."""
    owner = Job.tenant_id.is_(None) if tenant_id is None else Job.tenant_id == tenant_id
    return session.scalar(select(Job).where(owner, Job.idempotency_key == key))


def get_job(session: Session, job_id: str) -> Job | None:
    return session.get(Job, job_id)


def list_jobs(
    session: Session, *, visible: ColumnElement[bool], status: str | None, limit: int
) -> Sequence[Job]:
    """Newest first, among the jobs `visible` (a WHERE clause on `job`) keeps."""
    query = select(Job).where(visible).order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)
    if status:
        query = query.where(Job.status == status)
    return session.scalars(query).all()


def insert_requests(session: Session, rows: list[dict[str, Any]]) -> list[int]:
    """Bulk insert; the new ids come back in the order of `rows`.

    On PostgreSQL the ids are drawn from the sequence first and the rows sent by COPY.
    """
    table = REQUEST_TABLE
    if not _on_postgresql(session):
        statement = insert(table).returning(table.c.id, sort_by_parameter_order=True)
        return list(session.execute(statement, rows).scalars())
    ids = list(
        session.execute(
            text(
                "SELECT nextval(pg_get_serial_sequence('request', 'id')) FROM generate_series(1, :n)"
            ),
            {"n": len(rows)},
        ).scalars()
    )
    columns = ("id", *rows[0])
    _copy(
        session, "request", columns, ((i, *row.values()) for i, row in zip(ids, rows, strict=True))
    )
    return ids


DOCUMENT_COLUMNS = ("request_id", "position", "content", "doc_id")
# (request_id, position, content, doc_id), in the order of DOCUMENT_COLUMNS.
DocumentRow = tuple[int, int, str, str | None]
# Rows per multi-row INSERT where there is no COPY.
DOCUMENT_INSERT_BATCH = 5000


def insert_documents(session: Session, rows: Iterable[DocumentRow]) -> int:
    """Bulk insert inside the session's transaction; returns the number of rows.

    `rows` may be a generator still reading the input: PostgreSQL takes them all in one
    COPY, so the server stores rows while the caller parses the next ones. Other
    databases get multi-row INSERTs of DOCUMENT_INSERT_BATCH rows.
    """
    if _on_postgresql(session):
        return _copy(session, "document", DOCUMENT_COLUMNS, rows)
    count = 0
    for batch in _chunks(rows, DOCUMENT_INSERT_BATCH):
        session.execute(
            insert(DOCUMENT_TABLE), [dict(zip(DOCUMENT_COLUMNS, row, strict=True)) for row in batch]
        )
        count += len(batch)
    return count


def _chunks(rows: Iterable[DocumentRow], size: int) -> Iterator[list[DocumentRow]]:
    iterator = iter(rows)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _copy(
    session: Session, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]
) -> int:
    """COPY rows into a table inside the session's transaction (PostgreSQL); returns the
    number of rows. An exception raised by `rows` aborts the COPY and propagates."""
    driver = session.connection().connection.driver_connection
    assert driver is not None
    statement = f"COPY {table} ({', '.join(columns)}) FROM STDIN"
    count = 0
    with driver.cursor() as cursor, cursor.copy(statement) as copy:
        for row in rows:
            copy.write_row(row)
            count += 1
    return count


# A job that adds at least this many rows, and more than STALE_FRACTION of the rows the
# planner knows of, has the table analyzed before its requests are sent.
ANALYZE_MIN_ROWS = 1000
STALE_FRACTION = 0.2
ANALYZE_LOCK_TIMEOUT_MS = 2000


def refresh_statistics(session: Session, added: dict[str, int]) -> list[str]:
    """ANALYZE the tables that a submit grew past what PostgreSQL's planner knows; returns
    their names.

    Autovacuum analyzes a table only a while after it grew, and until then the planner
    guesses: with a never-analyzed `document` it chose a sequential scan over every
    document to fetch one task's 320 (7 to 22 ms per claim instead of under one). The
    PostgreSQL manual advises ANALYZE after a bulk load ("Populating a Database").
    """
    large = {table: rows for table, rows in added.items() if rows >= ANALYZE_MIN_ROWS}
    if not large or not _on_postgresql(session):
        return []  # a small submit (an interactive one) costs no round trip here
    stale = []
    for table, rows in large.items():
        known = session.scalar(
            text("SELECT reltuples FROM pg_class WHERE oid = to_regclass(:table)"),
            {"table": table},
        )
        if rows > STALE_FRACTION * max(known or 0, 0):
            stale.append(table)
    if stale:
        # Not behind an autovacuum of the table (or another submit's ANALYZE) for long.
        session.execute(text(f"SET LOCAL lock_timeout = '{ANALYZE_LOCK_TIMEOUT_MS}ms'"))
        session.execute(text(f"ANALYZE {', '.join(stale)}"))
    return stale


def set_document_count(session: Session, request_id: int, count: int) -> None:
    session.execute(update(Request).where(Request.id == request_id).values(document_count=count))


def request_ids(session: Session, job_id: str, statuses: Iterable[str]) -> list[int]:
    query = (
        select(Request.id)
        .where(Request.job_id == job_id, Request.status.in_(list(statuses)))
        .order_by(Request.position)
    )
    return list(session.scalars(query))


def mark_enqueued(session: Session, ids: Sequence[int]) -> None:
    session.execute(update(Request).where(Request.id.in_(ids)).values(enqueued_at=utcnow()))


def claim_requests(
    session: Session, ids: Sequence[int], *, lease_s: float, max_deliveries: int
) -> tuple[list[RequestWork], list[int]]:
    """Take the requests that nobody holds (queued, or running with an expired lease).

    Returns the work to run and the ids failed as poison (delivered too often). Core
    statements on the session's connection: this runs for every task, and the ORM's
    bulk-update bookkeeping has nothing to do here.
    """
    conn = session.connection()
    request, job = REQUEST_TABLE.c, JOB_TABLE.c
    now = utcnow()
    claimable = or_(
        request.status == RequestStatus.QUEUED,
        (request.status == RequestStatus.RUNNING) & (request.lease_expires_at < now),
    )
    claimed = conn.execute(
        update(REQUEST_TABLE)
        .where(request.id.in_(ids), claimable)
        .values(
            status=RequestStatus.RUNNING,
            deliveries=request.deliveries + 1,
            lease_expires_at=now + dt.timedelta(seconds=lease_s),
        )
        .returning(
            request.id,
            request.deliveries,
            request.job_id,
            request.query,
            request.model,
            request.top_n,
            request.return_documents,
        )
    ).all()
    poison = [r.id for r in claimed if r.deliveries > max_deliveries]
    runnable = sorted((r for r in claimed if r.deliveries <= max_deliveries), key=lambda r: r.id)
    if poison:
        conn.execute(
            update(REQUEST_TABLE)
            .where(request.id.in_(poison))
            .values(
                status=RequestStatus.FAILED,
                finished_at=now,
                lease_expires_at=None,
                error_type="poison",
                error_message=f"delivered more than {max_deliveries} times without finishing",
            )
        )
    if not runnable:
        return [], poison
    jobs = {
        row.id: row
        for row in conn.execute(
            select(job.id, job.status, job.priority, job.use_cache).where(
                job.id.in_({r.job_id for r in runnable})
            )
        )
    }
    starting = [job_id for job_id, row in jobs.items() if row.status == JobStatus.QUEUED]
    if starting:
        # A job's first claims all find it queued. One of them marks it running; the others
        # skip its locked row rather than wait for that claim's transaction to commit.
        unlocked = (
            select(job.id)
            .where(job.id.in_(starting), job.status == JobStatus.QUEUED)
            .with_for_update(skip_locked=True)
        )
        conn.execute(
            update(JOB_TABLE)
            .where(job.id.in_(unlocked))
            .values(status=JobStatus.RUNNING, started_at=now)
        )
    documents: dict[int, list[tuple[str, str | None]]] = {r.id: [] for r in runnable}
    document = DOCUMENT_TABLE.c
    for request_id, content, doc_id in conn.execute(
        select(document.request_id, document.content, document.doc_id)
        .where(document.request_id.in_(documents))
        .order_by(document.request_id, document.position)
    ):
        documents[request_id].append((content, doc_id))
    work = []
    for r in runnable:
        docs = documents[r.id]
        ids_given = any(doc_id is not None for _, doc_id in docs)
        work.append(
            RequestWork(
                request_id=r.id,
                job_id=r.job_id,
                query=r.query,
                model=r.model,
                top_n=r.top_n,
                return_documents=r.return_documents,
                documents_json=[content for content, _ in docs],
                doc_ids=[doc_id for _, doc_id in docs] if ids_given else None,
                priority=jobs[r.job_id].priority,
                use_cache=jobs[r.job_id].use_cache,
            )
        )
    return work, poison


def renew_leases(session: Session, ids: Sequence[int], *, lease_s: float) -> None:
    session.execute(
        update(Request)
        .where(Request.id.in_(ids), Request.status == RequestStatus.RUNNING)
        .values(lease_expires_at=utcnow() + dt.timedelta(seconds=lease_s))
    )


# One row per upstream attempt, in the order record_outcomes builds them.
UPSTREAM_CALL_COLUMNS = (
    "job_id",
    "request_id",
    "key_name",
    "model",
    "status_code",
    "outcome",
    "documents",
    "total_tokens",
    "latency_ms",
    "created_at",
)


def _while_running(column: ColumnElement[Any], value: ColumnElement[Any]) -> ColumnElement[Any]:
    """`value` for a request that is still running; its current value otherwise."""
    running: ColumnElement[str] = literal_column(f"'{RequestStatus.RUNNING.value}'")
    return case((REQUEST_TABLE.c.status == running, value), else_=column)


_request = REQUEST_TABLE.c
# One statement per finished request, built once: the tokens billed are always added, and the
# outcome applies only while the request is still running (see record_outcomes).
RECORD_OUTCOME = (
    update(REQUEST_TABLE)
    .where(_request.id == bindparam("b_id"))
    .values(
        total_tokens=_request.total_tokens + bindparam("b_tokens"),
        status=_while_running(_request.status, bindparam("b_status")),
        results_json=_while_running(_request.results_json, bindparam("b_results")),
        error_type=_while_running(_request.error_type, bindparam("b_error_type")),
        error_message=_while_running(_request.error_message, bindparam("b_error_message")),
        cache_hits=_while_running(_request.cache_hits, bindparam("b_cache_hits")),
        tokens_saved=_while_running(_request.tokens_saved, bindparam("b_tokens_saved")),
        finished_at=_while_running(_request.finished_at, bindparam("b_finished_at")),
        lease_expires_at=_while_running(_request.lease_expires_at, null()),
    )
)


def record_outcomes(session: Session, outcomes: Sequence[RequestOutcome]) -> None:
    """Write finished requests in one round of statements; every upstream attempt is logged
    (by COPY on PostgreSQL: psycopg adapts executemany parameters one at a time in Python).

    Results apply only while a request is still running, so a run that lost its lease to
    another worker cannot overwrite or duplicate them; the tokens billed for every run are
    added to the request all the same.
    """
    conn = session.connection()
    calls = [
        (
            o.job_id,
            o.request_id,
            c.key_name,
            c.model,
            c.status_code,
            c.outcome,
            c.documents,
            c.total_tokens,
            c.latency_ms,
            c.created_at,
        )
        for o in outcomes
        for c in o.calls
    ]
    if calls and _on_postgresql(session):
        _copy(session, "upstream_call", UPSTREAM_CALL_COLUMNS, calls)
    elif calls:
        rows = [dict(zip(UPSTREAM_CALL_COLUMNS, call, strict=True)) for call in calls]
        conn.execute(insert(UPSTREAM_CALL_TABLE), rows)
    store_scores(session, [entry for o in outcomes for entry in o.new_scores])
    finished_at = utcnow()
    conn.execute(
        RECORD_OUTCOME,
        [
            {
                "b_id": o.request_id,
                "b_tokens": o.total_tokens,
                "b_status": o.status,
                "b_results": o.results_json,
                "b_error_type": o.error_type,
                "b_error_message": o.error_message,
                "b_cache_hits": o.cache_hits,
                "b_tokens_saved": o.tokens_saved,
                "b_finished_at": finished_at,
            }
            for o in outcomes
        ],
    )


def cached_scores(session: Session, keys: Sequence[bytes]) -> dict[bytes, CachedScore]:
    """The cached pairs among `keys` (on PostgreSQL in one statement, the keys packed into
    one bytea)."""
    unique = list(set(keys))
    if _on_postgresql(session):
        rows = session.execute(PG_CACHE_LOOKUP, {"keys": b"".join(unique)})
        return {key: CachedScore(score, tokens) for key, score, tokens in rows}
    table = SCORE_CACHE_TABLE
    found: dict[bytes, CachedScore] = {}
    for start in range(0, len(unique), CACHE_LOOKUP_BATCH):
        chunk = unique[start : start + CACHE_LOOKUP_BATCH]
        query = select(table.c.key, table.c.score, table.c.tokens).where(table.c.key.in_(chunk))
        found.update(
            (key, CachedScore(score, tokens)) for key, score, tokens in session.execute(query)
        )
    return found


def store_scores(session: Session, entries: Sequence[tuple[bytes, float, float]]) -> None:
    """Add scored pairs to the cache; a pair already there (another run's) is kept."""
    if not entries:
        return
    if _on_postgresql(session):
        keys, scores, tokens = zip(*entries, strict=True)
        session.execute(
            PG_CACHE_STORE,
            {
                "keys": b"".join(keys),
                "scores": _float_array(scores),
                "tokens": _float_array(tokens),
            },
        )
        return
    session.execute(
        sqlite.insert(SCORE_CACHE_TABLE).on_conflict_do_nothing(),
        [{"key": key, "score": score, "tokens": tokens} for key, score, tokens in entries],
    )


REDIS_EPOCH_ROW = 1


def last_redis_epoch(session: Session) -> str | None:
    return session.scalar(select(RedisEpoch.epoch).where(RedisEpoch.id == REDIS_EPOCH_ROW))


def save_redis_epoch(session: Session, epoch: str) -> None:
    """Keep `epoch` as the newest one seen (one row, written by whichever worker saw it)."""
    dialect = postgresql if _on_postgresql(session) else sqlite
    values = {"id": REDIS_EPOCH_ROW, "epoch": epoch, "seen_at": utcnow()}
    statement = dialect.insert(RedisEpoch).values(values)
    session.execute(
        statement.on_conflict_do_update(
            index_elements=[RedisEpoch.id],
            set_={"epoch": statement.excluded.epoch, "seen_at": statement.excluded.seen_at},
        )
    )


def _float_array(values: Iterable[float]) -> str:
    """A PostgreSQL array literal; `repr` round-trips a float exactly."""
    return "{" + ",".join(map(repr, values)) + "}"


def complete_job_if_done(session: Session, job_id: str) -> bool:
    """A running job with no pending request is completed (never a cancelled one)."""
    pending = (
        select(Request.id)
        .where(Request.job_id == job_id, Request.status.in_(REQUEST_PENDING))
        .exists()
    )
    return bool(
        _rowcount(
            session.execute(
                update(Job)
                .where(
                    Job.id == job_id,
                    Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]),
                    ~pending,
                )
                .values(status=JobStatus.COMPLETED, finished_at=utcnow())
            )
        )
    )


def job_counts(session: Session, job_id: str) -> JobCounts:
    rows = dict(
        session.execute(
            select(Request.status, func.count())
            .where(Request.job_id == job_id)
            .group_by(Request.status)
        ).all()
    )
    return JobCounts(
        total=sum(rows.values()),
        succeeded=rows.get(RequestStatus.SUCCEEDED, 0),
        failed=rows.get(RequestStatus.FAILED, 0),
        cancelled=rows.get(RequestStatus.CANCELLED, 0),
        pending=rows.get(RequestStatus.QUEUED, 0) + rows.get(RequestStatus.RUNNING, 0),
    )


def cancel_job(session: Session, job_id: str) -> bool:
    changed = _rowcount(
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]))
            .values(status=JobStatus.CANCELLED, finished_at=utcnow())
        )
    )
    session.execute(
        update(Request)
        .where(Request.job_id == job_id, Request.status == RequestStatus.QUEUED)
        .values(
            status=RequestStatus.CANCELLED,
            finished_at=utcnow(),
            error_type="cancelled",
            error_message="the job was cancelled before this request ran",
        )
    )
    return bool(changed)


def iter_results(
    session: Session, job_id: str, batch: int = 1000
) -> Iterator[Sequence[Sequence[Any]]]:
    """Rows in input order, in lists of up to `batch` (constant memory: a server-side
    cursor on PostgreSQL). Core rows, without the ORM's per-row work."""
    table = REQUEST_TABLE
    query = (
        select(
            table.c.custom_id,
            table.c.status,
            table.c.results_json,
            table.c.total_tokens,
            table.c.error_type,
            table.c.error_message,
        )
        .where(table.c.job_id == job_id)
        .order_by(table.c.position)
    )
    result = session.connection().execution_options(yield_per=batch).execute(query)
    yield from result.partitions()


def usage(
    session: Session, job_id: str | None, visible: ColumnElement[bool] | None = None
) -> list[UsageRow]:
    """Per key and model, over one job or over the jobs `visible` (a WHERE clause on `job`)
    keeps; every job when both are None."""
    billed = case((UpstreamCall.outcome == "ok", 1), else_=0)
    query = (
        select(
            UpstreamCall.key_name,
            UpstreamCall.model,
            func.count(),
            func.sum(billed),
            func.coalesce(func.sum(UpstreamCall.total_tokens), 0),
            ModelPrice.price_per_million_tokens,
            ModelPrice.currency,
        )
        .outerjoin(ModelPrice, ModelPrice.model == UpstreamCall.model)
        .group_by(
            UpstreamCall.key_name,
            UpstreamCall.model,
            ModelPrice.price_per_million_tokens,
            ModelPrice.currency,
        )
        .order_by(UpstreamCall.key_name, UpstreamCall.model)
    )
    if job_id:
        query = query.where(UpstreamCall.job_id == job_id)
    elif visible is not None:
        query = query.where(UpstreamCall.job_id.in_(select(Job.id).where(visible)))
    return [
        UsageRow(
            key_name=key,
            model=model,
            calls=int(calls),
            billed_calls=int(billed_calls or 0),
            total_tokens=int(tokens),
            cost=None if price is None else float(tokens) * float(price) / 1_000_000,
            currency=currency,
        )
        for key, model, calls, billed_calls, tokens, price, currency in session.execute(query)
    ]


@dataclass(frozen=True)
class CacheSavings:
    model: str
    documents: int
    hits: int
    tokens_saved: int
    cost_saved: float | None
    currency: str | None


def cache_savings(
    session: Session, job_id: str | None, visible: ColumnElement[bool] | None = None
) -> list[CacheSavings]:
    """Score-cache hits of succeeded requests, per model, and the tokens and cost saved
    (over one job, or the jobs `visible` keeps, as in `usage`)."""
    query = (
        select(
            Request.model,
            func.sum(Request.document_count),
            func.sum(Request.cache_hits),
            func.sum(Request.tokens_saved),
            ModelPrice.price_per_million_tokens,
            ModelPrice.currency,
        )
        .outerjoin(ModelPrice, ModelPrice.model == Request.model)
        .where(Request.status == RequestStatus.SUCCEEDED)
        .group_by(Request.model, ModelPrice.price_per_million_tokens, ModelPrice.currency)
        .order_by(Request.model)
    )
    if job_id:
        query = query.where(Request.job_id == job_id)
    elif visible is not None:
        query = query.where(Request.job_id.in_(select(Job.id).where(visible)))
    return [
        CacheSavings(
            model=model,
            documents=int(documents),
            hits=int(hits),
            tokens_saved=int(saved),
            cost_saved=None if price is None else float(saved) * float(price) / 1_000_000,
            currency=currency,
        )
        for model, documents, hits, saved, price, currency in session.execute(query)
    ]


def requeue_expired(session: Session, now: dt.datetime) -> list[tuple[int, str]]:
    """Put requests whose lease expired (their worker died) back in the queued state."""
    expired = session.execute(
        update(Request)
        .where(Request.status == RequestStatus.RUNNING, Request.lease_expires_at < now)
        .values(status=RequestStatus.QUEUED, lease_expires_at=None, enqueued_at=now)
        .returning(Request.id, Request.job_id)
    ).all()
    if not expired:
        return []
    priorities = {
        job_id: priority
        for job_id, priority in session.execute(
            select(Job.id, Job.priority).where(Job.id.in_({job_id for _, job_id in expired}))
        )
    }
    return [(request_id, priorities[job_id]) for request_id, job_id in expired]


def complete_jobs_of_requests(session: Session, ids: Sequence[int]) -> None:
    job_ids = session.scalars(select(Request.job_id).where(Request.id.in_(ids)).distinct())
    for job_id in list(job_ids):
        complete_job_if_done(session, job_id)


def stale_queued(
    session: Session, older_than: dt.datetime, limit: int = 5000
) -> list[tuple[int, str]]:
    return list(
        session.execute(
            select(Request.id, Job.priority)
            .join(Job, Job.id == Request.job_id)
            .where(
                Request.status == RequestStatus.QUEUED,
                Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]),
                or_(Request.enqueued_at.is_(None), Request.enqueued_at < older_than),
            )
            .order_by(Request.id)
            .limit(limit)
        ).tuples()
    )


def unfinished_job_ids(session: Session) -> list[str]:
    return list(session.scalars(select(Job.id).where(Job.status.not_in(JOB_ENDED))))


def job_warnings(job: Job) -> list[str]:
    return list(json.loads(job.warnings)) if job.warnings else []


@dataclass(frozen=True)
class OneRequestOutcome:
    """What a one-request job (a synchronous rerank) ended with."""

    job_status: str
    status: str
    model: str
    results_json: str | None
    total_tokens: int
    error_type: str | None
    error_message: str | None
    billed_calls: int


def one_request_outcome(session: Session, job_id: str) -> OneRequestOutcome | None:
    """The job's first request with its job's status and billed calls, in one statement."""
    billed = (
        select(func.count())
        .where(UpstreamCall.job_id == job_id, UpstreamCall.outcome == "ok")
        .scalar_subquery()
    )
    row = session.execute(
        select(
            Job.status,
            Request.status,
            Request.model,
            Request.results_json,
            Request.total_tokens,
            Request.error_type,
            Request.error_message,
            billed,
        )
        .join(Job, Job.id == Request.job_id)
        .where(Request.job_id == job_id)
        .order_by(Request.position)
        .limit(1)
    ).one_or_none()
    return OneRequestOutcome(*row) if row is not None else None


def job_status_of(session: Session, job_id: str) -> str | None:
    return session.scalar(select(Job.status).where(Job.id == job_id))
