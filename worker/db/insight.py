"""Aggregate reads for the displays (dashboard, `top`): GROUP BY queries with limits.

None of them reads every row of a big job: counts come from the (job_id, status) index,
recent calls from a bounded range of the primary key, failures grouped by type.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    ColumnElement,
    case,
    func,
    select,
)
from sqlalchemy.orm import Session

from worker.db import repository
from worker.db.models import (
    JOB_ENDED,
    Job,
    Request,
    RequestStatus,
    UpstreamCall,
    UsageDaily,
)

# Recent calls are looked for among at most this many of the newest rows.
RECENT_CALLS_ROWS = 200_000
FAILURE_GROUPS = 20


@dataclass(frozen=True)
class JobProgress:
    id: str
    status: str
    priority: str
    source: str | None
    tenant_id: int | None
    total: int
    succeeded: int
    failed: int
    cancelled: int
    created_at: dt.datetime

    @property
    def done(self) -> int:
        return self.succeeded + self.failed + self.cancelled

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": self.status,
            "priority": self.priority,
            "source": self.source,
            "total": self.total,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "cancelled": self.cancelled,
            "done": self.done,
            "created_at": self.created_at.isoformat(),
        }


@dataclass(frozen=True)
class RecentCalls:
    key_name: str
    calls: int
    ok: int
    rate_limited: int
    tokens: int


@dataclass(frozen=True)
class DailyUsage:
    day: str
    key_name: str
    model: str
    calls: int
    tokens: int
    cost: float | None


def _counts(session: Session, job_ids: list[str]) -> dict[str, dict[str, int]]:
    if not job_ids:
        return {}
    rows = session.execute(
        select(Request.job_id, Request.status, func.count())
        .where(Request.job_id.in_(job_ids))
        .group_by(Request.job_id, Request.status)
    )
    counts: dict[str, dict[str, int]] = {job_id: {} for job_id in job_ids}
    for job_id, status, count in rows:
        counts[job_id][status] = int(count)
    return counts


def jobs_with_progress(
    session: Session,
    visible: ColumnElement[bool],
    *,
    limit: int,
    open_only: bool = False,
    job_id: str | None = None,
) -> list[JobProgress]:
    """The newest jobs the caller may see (or one of them), with their request counts."""
    query = select(Job).where(visible).order_by(Job.created_at.desc()).limit(limit)
    if open_only:
        query = query.where(Job.status.not_in(JOB_ENDED))
    if job_id is not None:
        query = query.where(Job.id == job_id)
    jobs = list(session.scalars(query))
    counts = _counts(session, [j.id for j in jobs])
    return [
        JobProgress(
            id=j.id,
            status=j.status,
            priority=j.priority,
            source=j.source,
            tenant_id=j.tenant_id,
            total=j.total_requests,
            succeeded=counts[j.id].get(RequestStatus.SUCCEEDED, 0),
            failed=counts[j.id].get(RequestStatus.FAILED, 0),
            cancelled=counts[j.id].get(RequestStatus.CANCELLED, 0),
            created_at=j.created_at,
        )
        for j in jobs
    ]


def failures_by_type(session: Session, job_id: str) -> list[dict[str, Any]]:
    """A job's failed requests grouped by error type, with one example message each."""
    rows = session.execute(
        select(Request.error_type, func.count(), func.min(Request.error_message))
        .where(
            Request.job_id == job_id,
            Request.status.in_((RequestStatus.FAILED, RequestStatus.CANCELLED)),
        )
        .group_by(Request.error_type)
        .order_by(func.count().desc())
        .limit(FAILURE_GROUPS)
    )
    return [
        {"type": error_type or "unknown", "count": int(count), "example": example or ""}
        for error_type, count, example in rows
    ]


def calls_by_key_and_status(session: Session, job_id: str) -> list[dict[str, Any]]:
    """A job's upstream attempts per key and HTTP status (None: timeout or connection)."""
    rows = session.execute(
        select(UpstreamCall.key_name, UpstreamCall.status_code, func.count())
        .where(UpstreamCall.job_id == job_id)
        .group_by(UpstreamCall.key_name, UpstreamCall.status_code)
        .order_by(UpstreamCall.key_name, UpstreamCall.status_code)
    )
    return [{"key": key, "status": status, "calls": int(count)} for key, status, count in rows]


def recent_calls(session: Session, since: dt.datetime) -> list[RecentCalls]:
    """Calls made since `since`, per key, among the newest rows only (the primary key's
    range, so the table's size does not matter)."""
    newest = session.scalar(select(func.max(UpstreamCall.id)))
    if newest is None:
        return []
    ok = case((UpstreamCall.outcome == "ok", 1), else_=0)
    limited = case((UpstreamCall.status_code == 429, 1), else_=0)
    rows = session.execute(
        select(
            UpstreamCall.key_name,
            func.count(),
            func.sum(ok),
            func.sum(limited),
            func.coalesce(func.sum(UpstreamCall.total_tokens), 0),
        )
        .where(UpstreamCall.id > newest - RECENT_CALLS_ROWS, UpstreamCall.created_at >= since)
        .group_by(UpstreamCall.key_name)
        .order_by(UpstreamCall.key_name)
    )
    return [
        RecentCalls(key, int(calls), int(ok_calls or 0), int(limited_calls or 0), int(tokens))
        for key, calls, ok_calls, limited_calls, tokens in rows
    ]


def _day(session: Session, column: Any) -> Any:
    if session.get_bind().dialect.name == "postgresql":
        return func.date(func.timezone("UTC", column))
    return func.date(column)


def usage_by_day(
    session: Session,
    visible: ColumnElement[bool] | None,
    rollup_visible: ColumnElement[bool] | None,
    since: dt.datetime,
) -> list[DailyUsage]:
    """Billed tokens, calls and cost per UTC day, key and model since `since`: the live calls
    (of the jobs `visible` keeps) and the daily rollup of pruned jobs (`rollup_visible`)."""
    day = _day(session, UpstreamCall.created_at)
    live = (
        select(
            day,
            UpstreamCall.key_name,
            UpstreamCall.model,
            func.count(),
            func.coalesce(func.sum(UpstreamCall.total_tokens), 0),
            func.coalesce(func.sum(UpstreamCall.search_units), 0),
        )
        .where(UpstreamCall.created_at >= since)
        .group_by(day, UpstreamCall.key_name, UpstreamCall.model)
    )
    if visible is not None:
        live = live.where(UpstreamCall.job_id.in_(select(Job.id).where(visible)))
    rolled = (
        select(
            UsageDaily.day,
            UsageDaily.key_name,
            UsageDaily.model,
            func.sum(UsageDaily.calls),
            func.sum(UsageDaily.total_tokens),
            func.sum(UsageDaily.search_units),
        )
        .where(UsageDaily.day >= since.date())
        .group_by(UsageDaily.day, UsageDaily.key_name, UsageDaily.model)
    )
    if rollup_visible is not None:
        rolled = rolled.where(rollup_visible)
    sums: dict[tuple[str, str, str], list[int]] = {}
    for query in (live, rolled):
        for when, key, model, calls, tokens, units in session.execute(query):
            row = sums.setdefault((str(when), key, model), [0, 0, 0])
            row[0] += int(calls)
            row[1] += int(tokens or 0)
            row[2] += int(units or 0)
    prices = repository.model_prices(session)
    return [
        DailyUsage(
            day=when,
            key_name=key,
            model=model,
            calls=calls,
            tokens=tokens,
            cost=repository.price_of(prices, model, tokens, units),
        )
        for (when, key, model), (calls, tokens, units) in sorted(sums.items())
    ]
