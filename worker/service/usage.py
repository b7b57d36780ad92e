"""Usage: tokens, upstream calls and cost per key NAME and model, and what the cache saved."""

from __future__ import annotations

from typing import Any

from worker.db import repository
from worker.service.scope import OPERATOR, Scope, sessions, visible_job
from worker.settings import Settings


def usage_totals(rows: list[repository.UsageRow]) -> dict[str, Any]:
    costs = [r.cost for r in rows if r.cost is not None]
    unknown = sum(r.usage_unknown_calls for r in rows)
    return {
        "total_tokens": sum(r.total_tokens for r in rows),
        "search_units": sum(r.search_units for r in rows),
        "calls": sum(r.calls for r in rows),
        "billed_calls": sum(r.billed_calls for r in rows),
        "cost": round(sum(costs), 9) if costs else 0.0,
        "usage_unknown_calls": unknown,
        "notes": [unknown_usage_note(unknown)] if unknown else [],
    }


def unknown_usage_note(calls: int) -> str:
    return f"{calls} calls billed without a usage figure: their tokens are not in the totals"


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


def usage_report(
    job_id: str | None, settings: Settings | None = None, scope: Scope = OPERATOR
) -> dict[str, Any]:
    """One job's usage, or that of every job the caller may see."""
    visible = None if scope.sees_all else scope.jobs_filter()
    rollup_visible = None if scope.sees_all else scope.rollup_filter()
    with sessions(settings)() as session:
        if job_id:
            visible_job(session, job_id, scope)
        rows = repository.usage(session, job_id, visible, rollup_visible)
        savings = repository.cache_savings(session, job_id, visible)
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
                "search_units": r.search_units,
                "usage_unknown_calls": r.usage_unknown_calls,
                "cost": r.cost,
                "currency": r.currency,
            }
            for r in rows
        ],
    }
