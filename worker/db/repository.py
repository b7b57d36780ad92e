"""Every query rerank-worker makes."""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import psycopg
from sqlalchemy import (
    ColumnElement,
    CursorResult,
    Result,
    Table,
    and_,
    bindparam,
    case,
    func,
    insert,
    literal_column,
    null,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from worker import errors
from worker.cache import KEY_BYTES
from worker.db.base import utcnow
from worker.db.models import (
    JOB_ENDED,
    JOB_OPEN,
    REQUEST_PENDING,
    Document,
    Job,
    JobStatus,
    ModelPrice,
    Notification,
    NotificationAttempt,
    NotificationStatus,
    PriceUnit,
    RedisEpoch,
    Request,
    RequestStatus,
    ScoreCache,
    Tenant,
    UpstreamCall,
    UsageDaily,
)
from worker.domain import CachedScore, JobBudget, OneRequestOutcome, RequestOutcome, RequestWork

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
    search_units: int = 0
    # Billed calls whose answer carried no usage figure (their tokens are not in the total).
    usage_unknown_calls: int = 0


# Where PostgreSQL says which value of a COPY it refused: "COPY request, line 1, column top_n".
_COPY_COLUMN = re.compile(r"column (\w+)")


def _refusal(table: str, exc: BaseException) -> errors.InputError:
    """A value the database or its driver refused, as bad input naming the table (and the
    column, when the database says which)."""
    column = None
    diag = getattr(exc, "diag", None)
    if diag is not None:
        column = diag.column_name
        found = _COPY_COLUMN.search(diag.context or "")
        column = column or (found.group(1) if found else None)
        reason = diag.message_primary or str(exc)
    else:
        reason = str(exc)
    where = f"{table}.{column}" if column else table
    return errors.InputError(
        f"the database refused a value for {where}: {reason.splitlines()[0]}", field=column
    )


@contextlib.contextmanager
def _refused_values(table: str) -> Iterator[None]:
    """The storage edge of submit: what validation let through and the database refuses
    is bad input; any other failure of the driver used directly is a StorageError. Other
    SQLAlchemy errors pass as they are."""
    try:
        yield
    except (UnicodeEncodeError, OverflowError, psycopg.DataError, sa_exc.DataError) as exc:
        raise _refusal(table, exc) from exc
    except sa_exc.StatementError as exc:
        if isinstance(exc.orig, UnicodeEncodeError | OverflowError):
            raise _refusal(table, exc.orig) from exc
        raise
    except psycopg.Error as exc:
        raise errors.StorageError(f"database error ({type(exc).__name__}): {exc}") from exc


def insert_job(session: Session, values: Mapping[str, Any]) -> None:
    """A new job's row (Core: a submit's few statements skip the ORM's unit of work)."""
    with _refused_values("job"):
        session.execute(insert(JOB_TABLE).values(values))


def set_job_totals(
    session: Session, job_id: str, total_requests: int, warnings_json: str | None
) -> None:
    job = JOB_TABLE.c
    session.execute(
        update(JOB_TABLE)
        .where(job.id == job_id)
        .values(total_requests=total_requests, warnings=warnings_json)
    )


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


# Fewer rows than this go in one INSERT: COPY's setup costs more round trips than they do.
COPY_MIN_ROWS = 64


def insert_requests(session: Session, rows: list[dict[str, Any]]) -> list[int]:
    """Bulk insert; the new ids come back in the order of `rows`.

    On PostgreSQL the ids are drawn from the sequence first and the rows sent by COPY, whose
    errors name the column of a refused value.
    """
    table = REQUEST_TABLE
    if not _on_postgresql(session):
        statement = insert(table).returning(table.c.id, sort_by_parameter_order=True)
        with _refused_values("request"):
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
    with _refused_values("request"):
        _copy(
            session,
            "request",
            columns,
            ((i, *row.values()) for i, row in zip(ids, rows, strict=True)),
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
    COPY, so the server stores rows while the caller parses the next ones. Fewer than
    COPY_MIN_ROWS, and other databases, get multi-row INSERTs of DOCUMENT_INSERT_BATCH rows.
    """
    with _refused_values("document"):
        if _on_postgresql(session):
            iterator = iter(rows)
            first = list(itertools.islice(iterator, COPY_MIN_ROWS))
            if len(first) == COPY_MIN_ROWS:
                return _copy(
                    session, "document", DOCUMENT_COLUMNS, itertools.chain(first, iterator)
                )
            rows = first
        count = 0
        for batch in _chunks(rows, DOCUMENT_INSERT_BATCH):
            session.execute(
                insert(DOCUMENT_TABLE),
                [dict(zip(DOCUMENT_COLUMNS, row, strict=True)) for row in batch],
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
            select(
                job.id, job.status, job.priority, job.use_cache, job.max_tokens, job.max_cost
            ).where(job.id.in_({r.job_id for r in runnable}))
        )
    }
    budgets = _budgets(session, runnable, jobs)
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
                delivery=r.deliveries,
                doc_ids=[doc_id for _, doc_id in docs] if ids_given else None,
                priority=jobs[r.job_id].priority,
                use_cache=jobs[r.job_id].use_cache,
                budget=budgets.get((r.job_id, r.model)),
            )
        )
    return work, poison


def _budgets(
    session: Session, runnable: Sequence[Any], jobs: dict[str, Any]
) -> dict[tuple[str, str], JobBudget]:
    """The budget of each (capped job, model) among the claimed requests; nothing is read
    when no job has a cap."""
    capped = {
        job_id
        for job_id, row in jobs.items()
        if row.max_tokens is not None or row.max_cost is not None
    }
    if not capped:
        return {}
    prices = model_prices(session)
    spent = job_spend(session, capped, prices)
    return {
        (r.job_id, r.model): JobBudget(
            max_tokens=jobs[r.job_id].max_tokens,
            max_cost=jobs[r.job_id].max_cost,
            price_per_million_tokens=prices[r.model][0] if r.model in prices else None,
            price_per_search_unit=prices[r.model][1] if r.model in prices else None,
            spent_tokens=spent.get(r.job_id, (0, 0.0))[0],
            spent_cost=spent.get(r.job_id, (0, 0.0))[1],
        )
        for r in runnable
        if r.job_id in capped
    }


# model -> (price per million tokens, price per search unit, currency)
Prices = dict[str, tuple[float | None, float | None, str]]


def model_prices(session: Session) -> Prices:
    return {
        model: (per_million, per_unit, currency)
        for model, per_million, per_unit, currency in session.execute(
            select(
                ModelPrice.model,
                ModelPrice.price_per_million_tokens,
                ModelPrice.price_per_search_unit,
                ModelPrice.currency,
            )
        )
    }


def set_price(
    session: Session,
    model: str,
    price: float,
    unit: PriceUnit,
    currency: str | None,
    default_currency: str,
) -> None:
    row = session.get(ModelPrice, model)
    if row is None:
        row = ModelPrice(model=model, currency=currency or default_currency)
        session.add(row)
    elif currency:
        row.currency = currency
    per_million = unit is PriceUnit.MILLION_TOKENS
    row.price_per_million_tokens = price if per_million else None
    row.price_per_search_unit = None if per_million else price


def price_of(prices: Prices, model: str, tokens: int, search_units: int) -> float | None:
    """The cost of so many tokens and search units of a model; None when it has no price."""
    price = prices.get(model)
    if price is None or (price[0] is None and price[1] is None):
        return None
    per_million, per_unit, _ = price
    return tokens * (per_million or 0.0) / 1_000_000 + search_units * (per_unit or 0.0)


def job_spend(
    session: Session, job_ids: Iterable[str], prices: Prices
) -> dict[str, tuple[int, float]]:
    """Tokens and cost each job has billed, from its recorded calls."""
    call = UPSTREAM_CALL_TABLE.c
    spent: dict[str, tuple[int, float]] = {}
    for job_id, model, tokens, units in session.execute(
        select(call.job_id, call.model, func.sum(call.total_tokens), func.sum(call.search_units))
        .where(call.job_id.in_(list(job_ids)))
        .group_by(call.job_id, call.model)
    ):
        before_tokens, before_cost = spent.get(job_id, (0, 0.0))
        cost = price_of(prices, model, int(tokens or 0), int(units or 0)) or 0.0
        spent[job_id] = (before_tokens + int(tokens or 0), before_cost + cost)
    return spent


def renew_leases(session: Session, held: Sequence[tuple[int, int]], *, lease_s: float) -> None:
    """Extend the leases of `held` (request id, delivery) pairs, in one statement; a request
    claimed again since (its lease expired) belongs to the newer delivery and is skipped."""
    session.execute(
        update(Request)
        .where(
            Request.id.in_([request_id for request_id, _ in held]),  # the index finds them
            tuple_(Request.id, Request.deliveries).in_(held),
            Request.status == RequestStatus.RUNNING,
        )
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
    "search_units",
    "usage_unknown",
)


_request = REQUEST_TABLE.c
_RUNNING: ColumnElement[str] = literal_column(f"'{RequestStatus.RUNNING.value}'")
# The fence: the request is running under the delivery that reports (no newer claim took it).
_HOLDS_LEASE = (_request.status == _RUNNING) & (_request.deliveries == bindparam("b_delivery"))


def _while_running(column: ColumnElement[Any], value: ColumnElement[Any]) -> ColumnElement[Any]:
    """`value` while the reporting delivery holds the request's lease; its current value
    otherwise."""
    return case((_HOLDS_LEASE, value), else_=column)


# One statement per finished request, built once: the tokens billed are always added, and the
# outcome applies only where its delivery still holds the lease (see record_outcomes).
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

    Results apply only while the delivery that ran them still holds the request's lease
    (running, and `deliveries` unchanged since its claim), so a run that lost its lease to
    another delivery cannot overwrite or duplicate the newer run's result, even when it ends
    while that one still runs; the tokens billed for every run are added all the same.
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
            c.search_units,
            c.usage_unknown,
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
                "b_delivery": o.delivery,
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


@dataclass(frozen=True)
class EndedJob:
    """A job that a statement just ended, with whom to tell."""

    status: str
    finished_at: dt.datetime
    tenant_id: int | None
    webhook_url: str | None
    on_complete: str | None
    on_complete_queue: str | None

    @property
    def has_notifications(self) -> bool:
        return bool(self.webhook_url or self.on_complete)


def mark_job_ended(
    session: Session, job_id: str, status: JobStatus, *, only_when_done: bool = False
) -> EndedJob | None:
    """End a queued or running job (with `only_when_done`, only if every request is stored
    and none is pending);
    None when it had ended already. One statement: RETURNING hands back whom to tell.

    Call worker.service.ending instead: it writes the job's notifications in this same
    transaction.
    """
    job, request = JOB_TABLE.c, REQUEST_TABLE.c  # Core: this runs as every job ends
    statement = update(JOB_TABLE).where(job.id == job_id, job.status.in_(JOB_OPEN))
    if only_when_done:
        statement = statement.where(job.storing_until.is_(None))
        pending = (
            select(request.id)
            .where(request.job_id == job_id, request.status.in_(REQUEST_PENDING))
            .exists()
        )
        statement = statement.where(~pending)
    row = session.execute(
        statement.values(status=status, finished_at=utcnow()).returning(
            job.finished_at, job.tenant_id, job.webhook_url, job.on_complete, job.on_complete_queue
        )
    ).first()
    if row is None:
        return None
    finished_at, tenant_id, webhook_url, on_complete, on_complete_queue = row
    assert finished_at is not None
    return EndedJob(status, finished_at, tenant_id, webhook_url, on_complete, on_complete_queue)


def recent_latencies_ms(session: Session, limit: int) -> list[float]:
    """Latencies of the newest successful upstream calls."""
    call = UPSTREAM_CALL_TABLE.c
    return list(
        session.scalars(
            select(call.latency_ms)
            .where(call.outcome == "ok")
            .order_by(call.id.desc())
            .limit(limit)
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


def cancel_queued_requests(session: Session, job_id: str) -> None:
    end_queued_requests(
        session,
        job_id,
        RequestStatus.CANCELLED,
        "cancelled",
        "the job was cancelled before this request ran",
    )


def end_queued_requests(
    session: Session, job_id: str, status: RequestStatus, error_type: str, message: str
) -> None:
    """The job's queued requests end without running, with this error."""
    session.execute(
        update(Request)
        .where(Request.job_id == job_id, Request.status == RequestStatus.QUEUED)
        .values(status=status, finished_at=utcnow(), error_type=error_type, error_message=message)
    )


def renew_storing(session: Session, job_id: str, until: dt.datetime) -> bool:
    """Extend the storing lease of a job still open; False when the job has ended (it was
    cancelled, or failed by the sweeper) while its submit was storing it."""
    job = JOB_TABLE.c
    renewed = session.execute(
        update(JOB_TABLE)
        .where(job.id == job_id, job.status.in_(JOB_OPEN))
        .values(storing_until=until)
        .returning(job.id)
    ).first()
    return renewed is not None


def end_storing(session: Session, job_id: str) -> None:
    """Every request of the job is stored: it may complete."""
    job = JOB_TABLE.c
    session.execute(update(JOB_TABLE).where(job.id == job_id).values(storing_until=None))


def unstored_jobs(session: Session, now: dt.datetime) -> list[str]:
    """Open jobs whose submit stopped renewing its storing lease (it died or hung)."""
    query = select(Job.id).where(Job.status.in_(JOB_OPEN), Job.storing_until < now)
    return list(session.scalars(query))


RETRIED = (RequestStatus.FAILED, RequestStatus.CANCELLED)


def requeue_for_retry(session: Session, job_id: str) -> int:
    """Put a finished job's failed and cancelled requests back in the queue, as new: no
    deliveries counted (the poison check would fail them at once), no error, no result."""
    return _rowcount(
        session.execute(
            update(Request)
            .where(Request.job_id == job_id, Request.status.in_(RETRIED))
            .values(
                status=RequestStatus.QUEUED,
                deliveries=0,
                enqueued_at=utcnow(),
                lease_expires_at=None,
                finished_at=None,
                results_json=None,
                error_type=None,
                error_message=None,
                cache_hits=0,
                tokens_saved=0,
            )
        )
    )


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
    session: Session,
    job_id: str | None,
    visible: ColumnElement[bool] | None = None,
    rollup_visible: ColumnElement[bool] | None = None,
) -> list[UsageRow]:
    """Per key and model, over one job or over the jobs `visible` (a WHERE clause on `job`)
    keeps; every job when both are None. Without a job, the rollup of pruned jobs is added
    (the rows `rollup_visible`, a WHERE clause on `usage_daily`, keeps)."""
    call = UPSTREAM_CALL_TABLE.c
    ok = call.outcome == "ok"
    live = select(
        call.key_name,
        call.model,
        func.count(),
        func.sum(case((ok, 1), else_=0)),
        func.coalesce(func.sum(call.total_tokens), 0),
        func.coalesce(func.sum(call.search_units), 0),
        func.sum(case((ok & call.usage_unknown, 1), else_=0)),
    ).group_by(call.key_name, call.model)
    if job_id:
        live = live.where(call.job_id == job_id)
    elif visible is not None:
        live = live.where(call.job_id.in_(select(Job.id).where(visible)))
    totals: dict[tuple[str, str], list[int]] = {}
    queries = [live]
    if not job_id:
        rolled = select(
            UsageDaily.key_name,
            UsageDaily.model,
            func.sum(UsageDaily.calls),
            func.sum(UsageDaily.billed_calls),
            func.sum(UsageDaily.total_tokens),
            func.sum(UsageDaily.search_units),
            func.sum(UsageDaily.usage_unknown_calls),
        ).group_by(UsageDaily.key_name, UsageDaily.model)
        if rollup_visible is not None:
            rolled = rolled.where(rollup_visible)
        queries.append(rolled)
    for query in queries:
        for key, model, *figures in session.execute(query):
            sums = totals.setdefault((key, model), [0] * len(figures))
            for i, figure in enumerate(figures):
                sums[i] += int(figure or 0)
    prices = model_prices(session)
    return [
        UsageRow(
            key_name=key,
            model=model,
            calls=calls,
            billed_calls=billed,
            total_tokens=tokens,
            cost=price_of(prices, model, tokens, units),
            currency=prices[model][2] if model in prices else None,
            search_units=units,
            usage_unknown_calls=unknown,
        )
        for (key, model), (calls, billed, tokens, units, unknown) in sorted(totals.items())
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


def job_ids_of_requests(session: Session, ids: Sequence[int]) -> list[str]:
    return list(session.scalars(select(Request.job_id).where(Request.id.in_(ids)).distinct()))


def stale_queued(
    session: Session, older_than: dt.datetime, limit: int = 5000
) -> list[tuple[int, str]]:
    query = (
        select(Request.id, Job.priority)
        .join(Job, Job.id == Request.job_id)
        .where(
            Request.status == RequestStatus.QUEUED,
            Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]),
            or_(Request.enqueued_at.is_(None), Request.enqueued_at < older_than),
        )
        .order_by(Request.id)
        .limit(limit)
    )
    return [(request_id, priority) for request_id, priority in session.execute(query)]


def unfinished_job_ids(session: Session) -> list[str]:
    return list(session.scalars(select(Job.id).where(Job.status.not_in(JOB_ENDED))))


def job_warnings(job: Job) -> list[str]:
    return list(json.loads(job.warnings)) if job.warnings else []


# Retention (service/prune.py): short statements, each transaction a bounded batch.


def finished_jobs_before(session: Session, before: dt.datetime) -> list[tuple[str, int | None]]:
    """Finished jobs that ended (or, without an end, were made) before `before`."""
    ended = func.coalesce(Job.finished_at, Job.created_at)
    query = select(Job.id, Job.tenant_id).where(Job.status.in_(JOB_ENDED), ended < before)
    return [(job_id, tenant_id) for job_id, tenant_id in session.execute(query)]


def request_batch(
    session: Session, job_id: str, limit: int, max_documents: int
) -> list[tuple[int, int]]:
    """(id, document count) of up to `limit` of the job's requests, cut where their documents
    pass `max_documents` (at least one request)."""
    rows = session.execute(
        select(Request.id, Request.document_count)
        .where(Request.job_id == job_id)
        .order_by(Request.id)
        .limit(limit)
    )
    batch: list[tuple[int, int]] = []
    documents = 0
    for request_id, count in rows:
        if batch and documents + count > max_documents:
            break
        batch.append((request_id, count))
        documents += count
    return batch


def delete_document_range(session: Session, request_id: int, stop: int) -> int:
    return _rowcount(
        session.execute(
            DOCUMENT_TABLE.delete().where(
                DOCUMENT_TABLE.c.request_id == request_id, DOCUMENT_TABLE.c.position < stop
            )
        )
    )


def roll_up_calls(session: Session, request_ids: Sequence[int], tenant_id: int | None) -> None:
    """Add the requests' upstream calls to the daily rollup, per UTC day, key and model."""
    call = UPSTREAM_CALL_TABLE.c
    sums: dict[tuple[dt.date, str, str], list[int]] = {}
    for created_at, key, model, outcome, tokens, units, unknown in session.execute(
        select(
            call.created_at,
            call.key_name,
            call.model,
            call.outcome,
            call.total_tokens,
            call.search_units,
            call.usage_unknown,
        ).where(call.request_id.in_(request_ids))
    ):
        day = created_at.astimezone(dt.UTC).date()
        row = sums.setdefault((day, key, model), [0, 0, 0, 0, 0])
        billed = outcome == "ok"
        row[0] += 1
        row[1] += billed
        row[2] += tokens or 0
        row[3] += units or 0
        row[4] += bool(billed and unknown)
    if sums:
        session.execute(
            insert(UsageDaily),
            [
                {
                    "day": day,
                    "tenant_id": tenant_id,
                    "key_name": key,
                    "model": model,
                    "calls": calls,
                    "billed_calls": billed,
                    "total_tokens": tokens,
                    "search_units": units,
                    "usage_unknown_calls": unknown,
                }
                for (day, key, model), (calls, billed, tokens, units, unknown) in sums.items()
            ],
        )


@dataclass(frozen=True)
class DeletedRows:
    requests: int
    documents: int
    calls: int


def delete_requests(session: Session, request_ids: Sequence[int]) -> DeletedRows:
    """The requests with their calls and documents (which have no foreign key to them)."""
    calls = session.execute(
        UPSTREAM_CALL_TABLE.delete().where(UPSTREAM_CALL_TABLE.c.request_id.in_(request_ids))
    )
    documents = session.execute(
        DOCUMENT_TABLE.delete().where(DOCUMENT_TABLE.c.request_id.in_(request_ids))
    )
    requests = session.execute(REQUEST_TABLE.delete().where(REQUEST_TABLE.c.id.in_(request_ids)))
    return DeletedRows(_rowcount(requests), _rowcount(documents), _rowcount(calls))


def delete_job(session: Session, job_id: str) -> None:
    session.execute(UPSTREAM_CALL_TABLE.delete().where(UPSTREAM_CALL_TABLE.c.job_id == job_id))
    session.execute(JOB_TABLE.delete().where(JOB_TABLE.c.id == job_id))


def delete_cache_entries_before(session: Session, before: dt.datetime, limit: int) -> int:
    table = SCORE_CACHE_TABLE
    keys = list(
        session.scalars(select(table.c.key).where(table.c.created_at < before).limit(limit))
    )
    if not keys:
        return 0
    return _rowcount(session.execute(table.delete().where(table.c.key.in_(keys))))


def insert_notifications(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    session.execute(insert(Notification), list(rows))


@dataclass(frozen=True)
class ClaimedNotification:
    """A notification a worker holds the lease of, for its `attempt`th attempt."""

    id: int
    job_id: str
    message_id: str
    kind: str
    target: str
    queue: str | None
    payload: str
    attempt: int
    # The tenant's webhook secret; None for the CLI's jobs. Held in memory only, never shown.
    secret: str | None = field(repr=False)


def _due(now: dt.datetime) -> ColumnElement[bool]:
    """Waiting for its next attempt, or held by a worker whose lease ran out (it died)."""
    return or_(
        and_(
            Notification.status == NotificationStatus.PENDING,
            Notification.next_attempt_at <= now,
        ),
        and_(
            Notification.status == NotificationStatus.DELIVERING,
            Notification.lease_expires_at <= now,
        ),
    )


def any_notification_due(session: Session, now: dt.datetime) -> bool:
    """A read, so that idle workers polling the outbox take no write lock (SQLite)."""
    return session.scalar(select(Notification.id).where(_due(now)).limit(1)) is not None


def claim_notifications(
    session: Session, now: dt.datetime, *, lease_s: float, limit: int
) -> list[ClaimedNotification]:
    """Lease up to `limit` due notifications and count the attempt about to be made.

    One conditional UPDATE: on PostgreSQL the candidates are picked FOR UPDATE SKIP LOCKED,
    so workers claiming at once take different rows; SQLite runs one writer at a time, and
    the condition is checked again on each row as it is updated. The candidates are a CTE:
    PostgreSQL runs one once, where it may run an IN (subquery) again for each row and so
    take more than `limit` rows.
    """
    due = _due(now)
    picked = (
        select(Notification.id)
        .where(due)
        .order_by(Notification.next_attempt_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .cte("picked")
    )
    rows = session.execute(
        update(Notification)
        .where(Notification.id.in_(select(picked.c.id)), due)
        .values(
            status=NotificationStatus.DELIVERING,
            attempts=Notification.attempts + 1,
            lease_expires_at=now + dt.timedelta(seconds=lease_s),
        )
        .returning(
            Notification.id,
            Notification.job_id,
            Notification.message_id,
            Notification.kind,
            Notification.target,
            Notification.queue,
            Notification.payload,
            Notification.attempts,
            Notification.tenant_id,
        )
    ).all()
    tenants = {row.tenant_id for row in rows if row.tenant_id is not None}
    secrets = (
        {
            tenant_id: secret
            for tenant_id, secret in session.execute(
                select(Tenant.id, Tenant.webhook_secret).where(Tenant.id.in_(tenants))
            )
        }
        if tenants
        else {}
    )
    return [
        ClaimedNotification(
            id=row.id,
            job_id=row.job_id,
            message_id=row.message_id,
            kind=row.kind,
            target=row.target,
            queue=row.queue,
            payload=row.payload,
            attempt=row.attempts,
            secret=secrets.get(row.tenant_id) if row.tenant_id is not None else None,
        )
        for row in rows
    ]


@dataclass(frozen=True)
class AttemptRecord:
    """What one attempt did, and what the notification becomes after it."""

    notification_id: int
    attempt: int
    started_at: dt.datetime
    duration_ms: float
    status_code: int | None
    error: str | None
    # delivered, pending (with next_attempt_at) or failed
    outcome: NotificationStatus
    next_attempt_at: dt.datetime | None = None


def record_attempt(session: Session, record: AttemptRecord) -> bool:
    """Log the attempt; move the notification on only if this attempt still holds its lease
    (a worker that lost it to another one logs what it did and changes nothing else).
    Returns whether it moved the notification on."""
    session.execute(
        insert(NotificationAttempt).values(
            notification_id=record.notification_id,
            attempt=record.attempt,
            started_at=record.started_at,
            status_code=record.status_code,
            error=record.error,
            duration_ms=record.duration_ms,
        )
    )
    delivered = record.outcome == NotificationStatus.DELIVERED
    values: dict[str, Any] = {
        "status": record.outcome,
        "lease_expires_at": None,
        "last_status_code": record.status_code,
        "last_error": record.error,
    }
    if delivered:
        values["delivered_at"] = record.started_at + dt.timedelta(milliseconds=record.duration_ms)
    if record.next_attempt_at is not None:
        values["next_attempt_at"] = record.next_attempt_at
    changed = session.execute(
        update(Notification)
        .where(
            Notification.id == record.notification_id,
            Notification.attempts == record.attempt,
            Notification.status == NotificationStatus.DELIVERING,
        )
        .values(values)
    )
    return bool(_rowcount(changed))


def notifications_of_job(session: Session, job_id: str) -> Sequence[Notification]:
    return session.scalars(
        select(Notification).where(Notification.job_id == job_id).order_by(Notification.id)
    ).all()


def attempts_of_notifications(
    session: Session, ids: Sequence[int]
) -> Sequence[NotificationAttempt]:
    return session.scalars(
        select(NotificationAttempt)
        .where(NotificationAttempt.notification_id.in_(ids))
        .order_by(NotificationAttempt.notification_id, NotificationAttempt.attempt)
    ).all()


def one_request_outcome(session: Session, job_id: str) -> OneRequestOutcome | None:
    """The job's first request with its billed calls, in one statement."""
    billed = (
        select(func.count())
        .where(UpstreamCall.job_id == job_id, UpstreamCall.outcome == "ok")
        .scalar_subquery()
    )
    row = session.execute(
        select(
            Request.status,
            Request.model,
            Request.results_json,
            Request.total_tokens,
            Request.error_type,
            Request.error_message,
            billed,
        )
        .where(Request.job_id == job_id)
        .order_by(Request.position)
        .limit(1)
    ).one_or_none()
    return OneRequestOutcome(*row) if row is not None else None


def job_status_of(session: Session, job_id: str) -> str | None:
    return session.scalar(select(Job.status).where(Job.id == job_id))
