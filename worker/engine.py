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

from worker import catalog, constants, errors
from worker.db.base import utcnow
from worker.domain import CallRecord, RequestOutcome, RequestWork
from worker.upstream.client import CallResult, RerankClient, build_body
from worker.upstream.limits import KeyPool
from worker.upstream.retry import RetryPolicy

log = logging.getLogger(__name__)


def split(count: int, per_call: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of at most `per_call` documents."""
    return [(start, min(start + per_call, count)) for start in range(0, count, per_call)]


def merge(
    parts: Sequence[tuple[int, list[dict[str, Any]]]],
    *,
    top_n: int | None,
    doc_ids: list[str | None] | None,
) -> list[dict[str, Any]]:
    """Merge the rankings of a split request; `index` points into the submitted documents.

    A request sent in one call keeps the upstream's order exactly; parts are merged by
    score, each part's own order kept (heapq.merge is stable).
    """
    shifted = [
        [{**entry, "index": entry["index"] + offset} for entry in results]
        for offset, results in parts
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
    ) -> None:
        self._client = client
        self._pool = pool
        self._policy = policy
        self._max_documents_per_call = max_documents_per_call

    async def run(self, work: RequestWork) -> RequestOutcome:
        outcome = RequestOutcome(request_id=work.request_id, job_id=work.job_id, status="running")
        per_call = catalog.max_documents_per_call(work.model, self._max_documents_per_call)
        ranges = split(len(work.documents_json), per_call)
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(self._call_part(work, start, stop, outcome.calls))
                    for start, stop in ranges
                ]
        except* errors.Cancelled:
            outcome.status = "cancelled"
            outcome.error_type, outcome.error_message = "cancelled", "the job was cancelled"
        except* errors.UpstreamError as group_error:
            first = group_error.exceptions[0]
            assert isinstance(first, errors.UpstreamError)
            outcome.status = "failed"
            outcome.error_type, outcome.error_message = first.kind, first.message
        else:
            parts = [(start, task.result()) for (start, _), task in zip(ranges, tasks, strict=True)]
            ranked = merge(parts, top_n=work.top_n, doc_ids=work.doc_ids)
            outcome.status = "succeeded"
            outcome.results_json = json.dumps(ranked, ensure_ascii=False, separators=(",", ":"))
        outcome.total_tokens = sum(c.total_tokens for c in outcome.calls)
        return outcome

    async def _call_part(
        self, work: RequestWork, start: int, stop: int, calls: list[CallRecord]
    ) -> list[dict[str, Any]]:
        size = stop - start
        top_n = min(work.top_n, size) if work.top_n is not None else None
        body = build_body(
            model=work.model,
            query=work.query,
            documents_json=work.documents_json[start:stop],
            top_n=top_n,
            return_documents=work.return_documents,
        )
        path = catalog.model_spec(work.model).path
        failures = 0
        while True:
            async with self._pool.slot(work.job_id) as lease:
                started = utcnow()
                try:
                    result = await self._client.rerank(lease.key, path, body)
                    checked = _check_indices(result, size, lease.key.name)
                except errors.UpstreamError as exc:
                    error = exc
                    calls.append(self._record(work, lease.key.name, size, started, error=exc))
                    if isinstance(exc, errors.RateLimited):
                        # Paused before the slot is given back, so nobody slips in between.
                        await self._pool.pause(lease.key.name, self._pause_s(exc, failures + 1))
                else:
                    calls.append(self._record(work, lease.key.name, size, started, result=result))
                    return checked
            failures = await self._after_failure(work, error, failures)

    async def _after_failure(
        self, work: RequestWork, error: errors.UpstreamError, failures: int
    ) -> int:
        """Decide what a failed attempt means; raise to fail the part, else wait and go on."""
        key_name = error.key_name or "?"
        if isinstance(error, errors.KeyUnusable):
            await self._pool.take_out_of_use(key_name, error.message, error.until_s)
            log.warning("action=key_out_of_use key=%s status=%s", key_name, error.status_code)
            return failures
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
        return CallRecord(
            key_name=key_name,
            model=work.model,
            status_code=result.status_code if result else (error.status_code if error else None),
            outcome="ok" if result else (error.kind if error else "unknown"),
            documents=documents,
            total_tokens=result.total_tokens if result else 0,
            latency_ms=result.latency_ms if result else latency_ms,
            created_at=started,
        )
