"""Run requests against the upstream: split, call with retries under shared limits, merge.

All of it is asyncio, so one process keeps every key's slots busy without a thread
per slot. `Reranker.run` never raises for an upstream problem: it returns the request's
outcome with every attempt recorded, so nothing is lost between here and SQL.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import logging
from collections.abc import Sequence
from typing import Any

from worker import catalog, constants, errors, metrics
from worker.db.base import utcnow
from worker.domain import CachedScore, CallRecord, RequestOutcome, RequestWork
from worker.upstream import token_estimate
from worker.upstream.budget import JobBudgets, Reservation, billed_cost
from worker.upstream.client import CallResult, RerankClient, build_body
from worker.upstream.limits import KeyPool
from worker.upstream.retry import RetryPolicy

log = logging.getLogger(__name__)


def split(count: int, per_call: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of at most `per_call` documents."""
    return [(start, min(start + per_call, count)) for start in range(0, count, per_call)]


def merge(
    parts: Sequence[tuple[Sequence[int], list[dict[str, Any]]]],
    *,
    top_n: int | None,
    doc_ids: list[str | None] | None,
) -> list[dict[str, Any]]:
    """Merge the rankings of a split request; `index` points into the submitted documents.

    Each part pairs a ranking with the positions of the documents it ranked (a call's
    index i is the document at positions[i]). A request answered by one call keeps the
    upstream's order exactly; parts are merged by score, each part's own order kept
    (heapq.merge is stable).
    """
    shifted = [
        [{**entry, "index": positions[entry["index"]]} for entry in results]
        for positions, results in parts
    ]
    if len(shifted) == 1:
        ranked = shifted[0]
    else:
        ranked = list(heapq.merge(*shifted, key=lambda e: -float(e["relevance_score"])))
    if top_n is not None:
        ranked = ranked[:top_n]
    if doc_ids is not None:
        for entry in ranked:
            doc_id = doc_ids[entry["index"]]
            if doc_id is not None:
                entry["id"] = doc_id
    return ranked


def cached_ranking(cached: dict[int, CachedScore]) -> list[dict[str, Any]]:
    """The cache hits as one more part: best first, ties by position."""
    ordered = sorted(cached.items(), key=lambda item: (-item[1].score, item[0]))
    return [{"index": position, "relevance_score": hit.score} for position, hit in ordered]


def _check_indices(result: CallResult, size: int, key_name: str) -> list[dict[str, Any]]:
    cleaned = []
    for entry in result.results:
        index = entry.get("index") if isinstance(entry, dict) else None
        score = entry.get("relevance_score") if isinstance(entry, dict) else None
        if (
            not isinstance(index, int)
            or not 0 <= index < size
            or not isinstance(score, int | float)
        ):
            raise errors.RetryableError(
                f"upstream answered a malformed result on key '{key_name}'",
                key_name=key_name,
                status_code=200,
            )
        row = {"index": index, "relevance_score": score}
        if "document" in entry:
            row["document"] = entry["document"]
        cleaned.append(row)
    return cleaned


class Reranker:
    def __init__(
        self,
        client: RerankClient,
        pool: KeyPool,
        policy: RetryPolicy,
        *,
        max_documents_per_call: int | None,
        budgets: JobBudgets | None = None,
    ) -> None:
        self._client = client
        self._pool = pool
        self._policy = policy
        self._max_documents_per_call = max_documents_per_call
        self._budgets = budgets

    async def run(self, work: RequestWork) -> RequestOutcome:
        outcome = RequestOutcome(
            request_id=work.request_id, job_id=work.job_id, status="running", delivery=work.delivery
        )
        per_call = catalog.max_documents_per_call(work.model, self._max_documents_per_call)
        # Only the documents the cache does not know are sent, in calls as full as allowed.
        unknown = [p for p in range(len(work.documents_json)) if p not in work.cached]
        calls = [unknown[start:stop] for start, stop in split(len(unknown), per_call)]
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(self._call_part(work, positions, outcome))
                    for positions in calls
                ]
        except* errors.Cancelled:
            outcome.status = "cancelled"
            outcome.error_type, outcome.error_message = "cancelled", "the job was cancelled"
        except* errors.BudgetExceeded as group_error:
            refused = group_error.exceptions[0]
            assert isinstance(refused, errors.BudgetExceeded)
            outcome.status = "failed"
            outcome.error_type, outcome.error_message = refused.kind, refused.message
        except* errors.UpstreamError as group_error:
            first = group_error.exceptions[0]
            assert isinstance(first, errors.UpstreamError)
            outcome.status = "failed"
            outcome.error_type, outcome.error_message = first.kind, first.message
        else:
            parts: list[tuple[Sequence[int], list[dict[str, Any]]]] = [
                (positions, task.result()) for positions, task in zip(calls, tasks, strict=True)
            ]
            if work.cached:
                parts.append((range(len(work.documents_json)), cached_ranking(work.cached)))
                outcome.cache_hits = len(work.cached)
                outcome.tokens_saved = round(sum(hit.tokens for hit in work.cached.values()))
            ranked = merge(parts, top_n=work.top_n, doc_ids=work.doc_ids)
            outcome.status = "succeeded"
            outcome.results_json = json.dumps(ranked, ensure_ascii=False, separators=(",", ":"))
        outcome.total_tokens = sum(c.total_tokens for c in outcome.calls)
        return outcome

    async def _call_part(
        self, work: RequestWork, positions: list[int], outcome: RequestOutcome
    ) -> list[dict[str, Any]]:
        size = len(positions)
        keys = work.cache_keys
        # With the cache on, every score is asked for (top_n is applied after the merge):
        # the tokens are the same, and the next run finds each pair.
        top_n = min(work.top_n, size) if work.top_n is not None and keys is None else None
        documents = [work.documents_json[p] for p in positions]
        body = build_body(
            model=work.model,
            query=work.query,
            documents_json=documents,
            top_n=top_n,
            return_documents=work.return_documents,
        )
        path = catalog.model_spec(work.model).path
        estimated = token_estimate.estimate_tokens(work.model, documents, work.query)
        failures = 0
        while True:
            async with self._pool.slot(
                work.job_id, work.priority, model=work.model, estimated_tokens=estimated
            ) as lease:
                reservation = None
                if work.budget is not None:
                    reservation = await self._reserve(work, positions)
                started = utcnow()
                try:
                    result = await self._client.rerank(lease.key, path, body)
                    lease.billed_tokens = result.total_tokens
                    if reservation is not None:
                        await self._settle(work, reservation, result)
                        reservation = None
                    checked = _check_indices(result, size, lease.key.name)
                except errors.UpstreamError as exc:
                    error = exc
                    if reservation is not None:
                        await self._settle(work, reservation, None)
                        reservation = None
                    outcome.calls.append(
                        self._record(work, lease.key.name, size, started, error=exc)
                    )
                    # Paused or out of use before the slot is given back, so that no taker
                    # waiting for it slips in between and calls the key again.
                    if isinstance(exc, errors.RateLimited):
                        lease.billed_tokens = 0  # refused: nothing counted upstream
                        await self._pool.pause(lease.key.name, self._pause_s(exc, failures + 1))
                        metrics.KEY_PAUSES.labels(lease.key.name).inc()
                    elif isinstance(exc, errors.KeyUnusable):
                        await self._take_out_of_use(exc)
                else:
                    outcome.calls.append(
                        self._record(work, lease.key.name, size, started, result=result)
                    )
                    if keys is not None:
                        share = result.total_tokens / size
                        outcome.new_scores.extend(
                            (keys[positions[e["index"]]], e["relevance_score"], share)
                            for e in checked
                        )
                    return checked
                finally:
                    if reservation is not None and self._budgets is not None:
                        self._budgets.settle_soon(reservation)  # cut short: maybe billed
            failures = await self._after_failure(work, error, failures)

    async def _reserve(self, work: RequestWork, positions: list[int]) -> Reservation:
        assert work.budget is not None and self._budgets is not None
        documents = [work.documents_json[p] for p in positions]
        return await self._budgets.reserve(
            work.job_id, work.model, work.budget, work.query, documents
        )

    async def _settle(
        self, work: RequestWork, reservation: Reservation, result: CallResult | None
    ) -> None:
        """Replace the reservation by what the call billed (nothing, for a refused call)."""
        assert work.budget is not None and self._budgets is not None
        if result is None:
            tokens, cost = 0, 0.0
        elif result.usage_known:
            tokens = result.total_tokens
            cost = billed_cost(work.budget, result.total_tokens, result.search_units)
        else:
            # Billed without a figure: the estimate is the best account of it.
            tokens, cost = reservation.tokens, reservation.cost
        await self._budgets.settle(reservation, tokens, cost)

    async def _after_failure(
        self, work: RequestWork, error: errors.UpstreamError, failures: int
    ) -> int:
        """Decide what a failed attempt means; raise to fail the part, else wait and go on."""
        key_name = error.key_name or "?"
        if isinstance(error, errors.KeyUnusable):
            return failures  # the key is out of use: go on at once on another
        if not isinstance(error, errors.RetryableError):
            raise error
        failures += 1
        if failures >= self._policy.max_attempts:
            error.message = f"{error.message} (gave up after {failures} attempts)"
            raise error
        if isinstance(error, errors.RateLimited):
            # The key is paused for everyone; this part may go on at once on another key.
            delay_s = self._policy.backoff_s(failures)
        else:
            delay_s = self._policy.delay_s(failures, error.retry_after_s)
        log.info(
            "action=rerank_retry request=%s key=%s status=%s attempt=%d delay_s=%.3f",
            work.request_id,
            key_name,
            error.status_code,
            failures,
            delay_s,
        )
        await asyncio.sleep(delay_s)
        return failures

    async def _take_out_of_use(self, error: errors.KeyUnusable) -> None:
        key_name = error.key_name or "?"
        await self._pool.take_out_of_use(key_name, error.message, error.until_s)
        metrics.KEY_RETIREMENTS.labels(key_name, str(error.status_code)).inc()
        log.warning("action=key_out_of_use key=%s status=%s", key_name, error.status_code)

    def _pause_s(self, error: errors.RateLimited, failures: int) -> float:
        if error.retry_after_s is not None:
            return min(error.retry_after_s, constants.MAX_RETRY_AFTER_S)
        return min(self._policy.cap_s, self._policy.base_s * 2.0**failures)

    @staticmethod
    def _record(
        work: RequestWork,
        key_name: str,
        documents: int,
        started: Any,
        *,
        result: CallResult | None = None,
        error: errors.UpstreamError | None = None,
    ) -> CallRecord:
        latency_ms = (utcnow() - started).total_seconds() * 1000
        record = CallRecord(
            key_name=key_name,
            model=work.model,
            status_code=result.status_code if result else (error.status_code if error else None),
            outcome="ok" if result else (error.kind if error else "unknown"),
            documents=documents,
            total_tokens=result.total_tokens if result else 0,
            latency_ms=result.latency_ms if result else latency_ms,
            created_at=started,
            search_units=result.search_units if result else 0,
            usage_unknown=result is not None and not result.usage_known,
        )
        status = metrics.call_status(record.status_code, error.transport_error if error else None)
        metrics.count_call(
            key_name, work.model, status, record.latency_ms / 1000, record.total_tokens
        )
        return record
