"""Notices that an interactive job ended, so that a caller waiting for it wakes at once.

The truth stays in SQL: a worker pushes a notice only after the transaction that ended the job
has committed, and a waiter also reads the job's row now and then, so a lost notice (Redis
restarted, a worker died between its commit and its push) costs time, never the answer. A list
per job rather than pub/sub: a notice pushed before its waiter began to listen still waits for
it, and the waiter needs no subscription made before the job exists.

A notice may carry the outcome of the request that ended the job, as that transaction wrote
it: for a one-request job (a synchronous rerank) that is the whole answer, and the waiter
needs no read of its own. It carries one only when SQL holds nothing else for the request:
from its first delivery (a later one adds to what an earlier, lost run billed).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping

import redis
import redis.asyncio as aioredis

from worker import constants
from worker.domain import OneRequestOutcome, RequestOutcome

log = logging.getLogger(__name__)

# The body of a notice that carries no outcome.
ENDED = b"1"


def _key(job_id: str) -> str:
    return constants.JOB_ENDED_KEY.format(job_id=job_id)


def notice_body(outcome: RequestOutcome, model: str) -> bytes:
    """The notice of the job this outcome ended (just committed)."""
    if outcome.delivery != 1:
        return ENDED
    carried = OneRequestOutcome(
        status=outcome.status,
        model=model,
        results_json=outcome.results_json,
        total_tokens=outcome.total_tokens,
        error_type=outcome.error_type,
        error_message=outcome.error_message,
        billed_calls=sum(1 for call in outcome.calls if call.outcome == "ok"),
    )
    return json.dumps(dataclasses.asdict(carried), separators=(",", ":")).encode()


def carried_outcome(body: bytes) -> OneRequestOutcome | None:
    """The outcome a notice carries, if it carries one."""
    return None if body == ENDED else OneRequestOutcome(**json.loads(body))


def announce_ended(client: redis.Redis, notices: Mapping[str, bytes]) -> None:
    """Push each job's notice, one round trip for all; a Redis that does not answer only
    delays waiters."""
    if not notices:
        return
    pipe = client.pipeline(transaction=False)
    for job_id, body in notices.items():
        pipe.rpush(_key(job_id), body)
        pipe.expire(_key(job_id), constants.JOB_ENDED_TTL_S)
    try:
        pipe.execute()
    except redis.exceptions.RedisError as exc:
        log.warning("action=job_ended_unannounced jobs=%d reason=%s", len(notices), exc)


async def wait_notice(client: aioredis.Redis, job_id: str, timeout_s: float) -> bytes | None:
    """The body of the job's notice if it came within `timeout_s` (it is taken off its list)."""
    # Redis takes a blocking timeout in seconds with decimals; 0 would mean forever.
    popped = await client.blpop([_key(job_id)], timeout=max(timeout_s, 0.001))
    if popped is None:
        return None
    body = popped[1]
    return body.encode() if isinstance(body, str) else body
