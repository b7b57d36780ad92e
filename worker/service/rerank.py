"""A synchronous rerank: one request, run as a one-request interactive job of the caller.

It takes the path every job takes (submit's validation and storage, the interactive queue, the
workers' key limits, score cache and usage), so a request larger than one upstream call is split
and merged as in any job. Then it waits for the job's end notice, which a worker pushes once the
outcome is committed (worker/completion.py) and which mostly carries that outcome; otherwise it
reads the outcome from SQL once. It answers the ranking, or raises RerankFailed with the
request's error type.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import anyio.to_thread
import redis
import redis.asyncio as aioredis

from worker import completion, constants, errors
from worker.db import repository
from worker.db.models import JOB_ENDED, RequestStatus
from worker.domain import OneRequestOutcome
from worker.service import control
from worker.service.scope import Scope, sessions
from worker.service.submit import JobOptions, submit_job
from worker.settings import Settings

log = logging.getLogger(__name__)

CUSTOM_ID = "rerank"


@dataclass(frozen=True)
class RerankInput:
    """One rerank as a caller sends it; validated by submit's own line parser (ingest)."""

    query: Any
    documents: list[Any]
    model: str | None = None
    top_n: int | None = None
    return_documents: bool = False

    def as_line(self) -> bytes:
        """The request as one line of a requests file. ASCII escapes keep a lone surrogate
        (valid JSON, not valid UTF-8) a matter for the parser, not an encoding crash here."""
        line: dict[str, Any] = {
            "custom_id": CUSTOM_ID,
            "query": self.query,
            "documents": self.documents,
        }
        if self.model is not None:
            line["model"] = self.model
        if self.top_n is not None:
            line["top_n"] = self.top_n
        return json.dumps(line, separators=(",", ":")).encode()


@dataclass
class Ranking:
    """A synchronous rerank's answer: `results` best first, `index` into the documents sent."""

    job_id: str
    model: str
    results: list[dict[str, Any]]
    total_tokens: int
    billed_calls: int
    # Where the time went: submit (store and publish), wait (workers), read (the outcome).
    timings_ms: dict[str, float] = field(default_factory=dict)


async def rerank(
    request: RerankInput,
    *,
    scope: Scope,
    redis_client: aioredis.Redis,
    settings: Settings,
    source: str,
    timeout_s: float | None = None,
) -> Ranking:
    """Run the request through the workers and answer its ranking."""
    started = time.perf_counter()
    job_id = await anyio.to_thread.run_sync(_submit, request, scope, settings, source)
    submitted = time.perf_counter()
    limit_s = timeout_s if timeout_s is not None else settings.sync_timeout_s
    outcome = await wait_for_end(job_id, scope, redis_client, settings, limit_s)
    ended = time.perf_counter()
    if outcome is None:
        outcome = await anyio.to_thread.run_sync(_read, job_id, settings)
    ranking = _ranking(job_id, request, outcome)
    ranking.timings_ms = {
        "submit": (submitted - started) * 1000,
        "wait": (ended - submitted) * 1000,
        "read": (time.perf_counter() - ended) * 1000,
    }
    return ranking


def _submit(request: RerankInput, scope: Scope, settings: Settings, source: str) -> str:
    options = JobOptions(priority=constants.QUEUE_INTERACTIVE)
    try:
        submitted = submit_job(
            [request.as_line()],
            source=source,
            options=options,
            tenant_id=scope.tenant_id,
            settings=settings,
        )
    except errors.InputError as exc:
        # The body is one request, not a file: its line number would only confuse.
        raise errors.InputError(exc.reason, field=exc.field) from exc
    return submitted.job_id


async def wait_for_end(
    job_id: str, scope: Scope, client: aioredis.Redis, settings: Settings, limit_s: float
) -> OneRequestOutcome | None:
    """Until the job's notice comes, or its row says it ended (a notice may be lost); the
    outcome if the notice carried it. At the deadline the job is cancelled, so that nobody
    pays for an answer nobody waits for."""
    deadline = time.monotonic() + limit_s
    while (left_s := deadline - time.monotonic()) > 0:
        look_s = min(left_s, constants.SYNC_STATUS_CHECK_S)
        try:
            body = await completion.wait_notice(client, job_id, look_s)
            if body is not None:
                return completion.carried_outcome(body)
        except redis.exceptions.RedisError as exc:
            log.warning("action=sync_notice_unavailable job=%s reason=%s", job_id, exc)
            await anyio.sleep(look_s)
        if await anyio.to_thread.run_sync(_has_ended, job_id, settings):
            return None
    await anyio.to_thread.run_sync(_cancel, job_id, scope, settings)
    raise errors.RerankTimedOut(f"the rerank did not end within {limit_s:g} s", job_id=job_id)


def _has_ended(job_id: str, settings: Settings) -> bool:
    with sessions(settings)() as session:
        return repository.job_status_of(session, job_id) in JOB_ENDED


def _cancel(job_id: str, scope: Scope, settings: Settings) -> None:
    control.cancel_job(job_id, settings, scope)


def _read(job_id: str, settings: Settings) -> OneRequestOutcome:
    with sessions(settings)() as session:
        outcome = repository.one_request_outcome(session, job_id)
    if outcome is None:
        raise errors.JobNotFound(f"no job with id '{job_id}'")
    return outcome


def _ranking(job_id: str, request: RerankInput, outcome: OneRequestOutcome) -> Ranking:
    if outcome.status != RequestStatus.SUCCEEDED:
        kind = outcome.error_type or outcome.status
        message = outcome.error_message or f"the rerank ended {outcome.status}"
        raise errors.RerankFailed(kind, message, job_id=job_id)
    results: list[dict[str, Any]] = json.loads(outcome.results_json or "[]")
    if request.return_documents:
        for entry in results:
            entry["document"] = as_jina_document(request.documents[entry["index"]])
    return Ranking(
        job_id=job_id,
        model=outcome.model,
        results=results,
        total_tokens=outcome.total_tokens,
        billed_calls=outcome.billed_calls,
    )


def as_jina_document(document: Any) -> Any:
    """A document as Jina returns it: a string as {"text": ...}, an object as it was sent.
    Taken from the caller's own request, so no call has to send documents back."""
    return {"text": document} if isinstance(document, str) else document
