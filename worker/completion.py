"""Notices that an interactive job ended, so that a caller waiting for it wakes at once.

The truth stays in SQL: a worker pushes a notice only after the transaction that ended the job
has committed, and a waiter also reads the job's row now and then, so a lost notice (Redis
restarted, a worker died between its commit and its push) costs time, never the answer. A list
per job rather than pub/sub: a notice pushed before its waiter began to listen still waits for
it, and the waiter needs no subscription made before the job exists.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

import redis
import redis.asyncio as aioredis

from worker import constants

log = logging.getLogger(__name__)


def _key(job_id: str) -> str:
    return constants.JOB_ENDED_KEY.format(job_id=job_id)


def announce_ended(client: redis.Redis, job_ids: Collection[str]) -> None:
    """One round trip for all the jobs; a Redis that does not answer only delays waiters."""
    if not job_ids:
        return
    pipe = client.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.rpush(_key(job_id), b"1")
        pipe.expire(_key(job_id), constants.JOB_ENDED_TTL_S)
    try:
        pipe.execute()
    except redis.exceptions.RedisError as exc:
        log.warning("action=job_ended_unannounced jobs=%d reason=%s", len(job_ids), exc)


async def wait_notice(client: aioredis.Redis, job_id: str, timeout_s: float) -> bool:
    """Whether the job's notice came within `timeout_s` (it is taken off its list)."""
    # Redis takes a blocking timeout in seconds with decimals; 0 would mean forever.
    popped = await client.blpop([_key(job_id)], timeout=max(timeout_s, 0.001))
    return popped is not None
