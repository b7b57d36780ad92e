"""Tables. Results are kept as the JSON text of their export form, so `results` streams fast."""

from __future__ import annotations

import datetime as dt
import enum

from sqlalchemy import (
    BigInteger,
    Boolean,
    Date,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    Numeric,
    String,
    Text,
    UniqueConstraint,
    false,
    func,
    true,
)
from sqlalchemy.orm import Mapped, mapped_column

from worker.db.base import Base, BigId, UTCDateTime, utcnow


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"


class RequestStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class NotificationKind(enum.StrEnum):
    WEBHOOK = "webhook"
    CELERY = "celery"


class NotificationStatus(enum.StrEnum):
    PENDING = "pending"
    DELIVERING = "delivering"
    DELIVERED = "delivered"
    FAILED = "failed"


JOB_OPEN = (JobStatus.QUEUED, JobStatus.RUNNING)
JOB_ENDED = (JobStatus.COMPLETED, JobStatus.CANCELLED, JobStatus.FAILED)
REQUEST_PENDING = (RequestStatus.QUEUED, RequestStatus.RUNNING)


class Tenant(Base):
    """Another service that calls the HTTP API with a token of its own.

    Only a hash of the token is kept; `token_prefix`, the token's first characters after its
    fixed `rrw_` head, finds the row, and the hash is then compared in constant time. The
    webhook secret signs this tenant's webhooks, so it is kept as it is.
    """

    __tablename__ = "tenant"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    token_prefix: Mapped[str] = mapped_column(String(16), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64))
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    webhook_secret: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)


class Job(Base):
    __tablename__ = "job"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED, index=True)
    priority: Mapped[str] = mapped_column(String(16))
    source: Mapped[str | None] = mapped_column(String(500))
    # None for the CLI's jobs.
    tenant_id: Mapped[int | None] = mapped_column(ForeignKey("tenant.id"), index=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    # Told when the job ends: a URL to POST a signed webhook to, a Celery task to send.
    webhook_url: Mapped[str | None] = mapped_column(String(2000))
    on_complete: Mapped[str | None] = mapped_column(String(200))
    on_complete_queue: Mapped[str | None] = mapped_column(String(200))
    # Caps on what the job may bill (tokens; cost in the price table's currency).
    max_tokens: Mapped[int | None] = mapped_column(BigInteger)
    max_cost: Mapped[float | None] = mapped_column(Numeric(18, 9, asdecimal=False))
    total_requests: Mapped[int] = mapped_column(Integer, default=0)
    # Pointwise scores may come from (and go to) the score cache; off per job on request.
    use_cache: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    warnings: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    started_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    # Set while a large submit still stores the job's requests in chunks (its first ones
    # may already run): the job cannot complete until it is None. The submit renews it
    # with each chunk; past it, the sweeper fails the job (its submit died).
    storing_until: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)


# An idempotency key is a tenant's own: another tenant's equal key is another job. The CLI's
# jobs (no tenant) share one namespace.
Index(
    "uq_job_tenant_idempotency_key",
    func.coalesce(Job.tenant_id, 0),
    Job.idempotency_key,
    unique=True,
)


class Request(Base):
    """One (query, documents) request; everything a worker needs to run it, by id."""

    __tablename__ = "request"
    __table_args__ = (
        UniqueConstraint("job_id", "position"),
        UniqueConstraint("job_id", "custom_id"),
        Index("ix_request_job_id_status", "job_id", "status"),
        Index("ix_request_status_lease", "status", "lease_expires_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("job.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    custom_id: Mapped[str] = mapped_column(String(200))
    query: Mapped[str] = mapped_column(Text)
    model: Mapped[str] = mapped_column(String(100))
    top_n: Mapped[int | None] = mapped_column(Integer)
    return_documents: Mapped[bool] = mapped_column(Boolean, default=False)
    document_count: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default=RequestStatus.QUEUED)
    deliveries: Mapped[int] = mapped_column(Integer, default=0)
    enqueued_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    # Large values (results_json here, document.content) use lz4 on PostgreSQL (migration 0005).
    results_json: Mapped[str | None] = mapped_column(Text)
    total_tokens: Mapped[int] = mapped_column(Integer, default=0)
    # Documents whose score came from the cache, and the tokens their calls had cost.
    cache_hits: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    tokens_saved: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    error_type: Mapped[str | None] = mapped_column(String(50))
    error_message: Mapped[str | None] = mapped_column(Text)


class Notification(Base):
    """The outbox: one message telling a job's producer that the job ended, written in the
    transaction that ended it and delivered by any worker, at least once.

    `payload` is the exact body (a webhook's JSON, a Celery callback's JSON args), made once so
    every attempt sends the same bytes under the same `message_id` (the `webhook-id`). A worker
    sending it holds a lease (`lease_expires_at`); once that passes, the row is due again.
    """

    __tablename__ = "notification"
    __table_args__ = (Index("ix_notification_status_next_attempt_at", "status", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("job.id", ondelete="CASCADE"), index=True)
    # The tenant whose webhook secret signs it; None for the CLI's jobs (RERANK_WEBHOOK_SECRET).
    tenant_id: Mapped[int | None] = mapped_column(ForeignKey("tenant.id", ondelete="CASCADE"))
    message_id: Mapped[str] = mapped_column(String(40), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    event: Mapped[str] = mapped_column(String(32))
    # A webhook's URL, or a Celery callback's task name and queue.
    target: Mapped[str] = mapped_column(String(2000))
    queue: Mapped[str | None] = mapped_column(String(200))
    payload: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default=NotificationStatus.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    delivered_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)


class NotificationAttempt(Base):
    """One attempt at sending a notification: an HTTP status, or why there was none."""

    __tablename__ = "notification_attempt"
    __table_args__ = (UniqueConstraint("notification_id", "attempt"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    notification_id: Mapped[int] = mapped_column(ForeignKey("notification.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    duration_ms: Mapped[float] = mapped_column(Float)


class Document(Base):
    """A request's documents, in submitted order, as the JSON they were given in.

    No foreign key to `request`: PostgreSQL checks one with a query per inserted row, which
    made a COPY of documents three to four times slower. Submit writes a request and its
    documents in one transaction, and nothing deletes requests.
    """

    __tablename__ = "document"

    request_id: Mapped[int] = mapped_column(BigId, primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    content: Mapped[str] = mapped_column(Text)
    doc_id: Mapped[str | None] = mapped_column(String(200))


class UpstreamCall(Base):
    """Every HTTP attempt at the upstream, billed or not: the source of usage figures."""

    __tablename__ = "upstream_call"
    __table_args__ = (Index("ix_upstream_call_key_model", "key_name", "model"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("job.id", ondelete="CASCADE"), index=True)
    request_id: Mapped[int] = mapped_column(ForeignKey("request.id", ondelete="CASCADE"))
    key_name: Mapped[str] = mapped_column(String(100))
    model: Mapped[str] = mapped_column(String(100))
    status_code: Mapped[int | None] = mapped_column(Integer)
    outcome: Mapped[str] = mapped_column(String(30))
    documents: Mapped[int] = mapped_column(Integer)
    total_tokens: Mapped[int] = mapped_column(Integer, default=0)
    # Models billed per search unit (a query with up to 100 documents) report these instead.
    search_units: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # A billed call whose answer carried no usage figure: its 0 tokens are not a count.
    usage_unknown: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    latency_ms: Mapped[float] = mapped_column(Float)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class UsageDaily(Base):
    """Usage of pruned jobs, rolled up per UTC day, tenant, key and model.

    `prune` writes these in the transaction that deletes the calls they sum, so `usage`
    (live calls plus this table) reports the same totals before and after. Several rows may
    share a day, key and model (one per pruned batch); readers sum them.
    """

    __tablename__ = "usage_daily"
    __table_args__ = (Index("ix_usage_daily_day", "day"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    day: Mapped[dt.date] = mapped_column(Date)
    # None for the CLI's jobs, as on `job`.
    tenant_id: Mapped[int | None] = mapped_column(Integer)
    key_name: Mapped[str] = mapped_column(String(100))
    model: Mapped[str] = mapped_column(String(100))
    calls: Mapped[int] = mapped_column(BigInteger)
    billed_calls: Mapped[int] = mapped_column(BigInteger)
    total_tokens: Mapped[int] = mapped_column(BigInteger)
    search_units: Mapped[int] = mapped_column(BigInteger)
    usage_unknown_calls: Mapped[int] = mapped_column(BigInteger)


class ScoreCache(Base):
    """Pointwise scores already paid for. `key` hashes (model, query, document content);
    `tokens` is the pair's share of its call's tokens, what a cache hit saves."""

    __tablename__ = "score_cache"

    key: Mapped[bytes] = mapped_column(LargeBinary(16), primary_key=True)
    score: Mapped[float] = mapped_column(Float)
    tokens: Mapped[float] = mapped_column(Float)
    # Set by the database, so the bulk stores stay as they are; `prune --cache-older-than`.
    created_at: Mapped[dt.datetime] = mapped_column(
        UTCDateTime, server_default=func.current_timestamp(), index=True
    )


class RedisEpoch(Base):
    """The newest epoch of the shared Redis state that any worker has seen (one row).

    A worker starting after Redis restarted empty cannot tell that restart from a first
    start by looking at Redis; this row, outside Redis, tells it (see upstream/limits.py).
    """

    __tablename__ = "redis_epoch"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    epoch: Mapped[str] = mapped_column(String(64))
    seen_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class PriceUnit(enum.StrEnum):
    MILLION_TOKENS = "million_tokens"
    SEARCH_UNIT = "search_unit"


class ModelPrice(Base):
    """A model's price: per million tokens, or per search unit for models billed so."""

    __tablename__ = "model_price"

    model: Mapped[str] = mapped_column(String(100), primary_key=True)
    price_per_million_tokens: Mapped[float | None] = mapped_column(Numeric(14, 6, asdecimal=False))
    price_per_search_unit: Mapped[float | None] = mapped_column(Numeric(14, 9, asdecimal=False))
    currency: Mapped[str] = mapped_column(String(10), default="PTC")
