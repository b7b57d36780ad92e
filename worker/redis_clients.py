"""This process's Redis clients, and where Redis is (the configured URL or the embedded one).

Kept apart from the engine so that the CLI reaches Redis without importing the HTTP stack.
"""

from __future__ import annotations

import functools

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.retry import Retry as SyncRetry

from worker import embedded
from worker.settings import Settings

REDIS_COMMAND_RETRIES = 3


def redis_url(settings: Settings) -> str:
    """RERANK_REDIS_URL, or the embedded Redis in the data dir (started on first use)."""
    if settings.redis_url:
        return settings.redis_url
    return embedded.ensure_embedded_redis(settings.resolved_data_dir())


@functools.lru_cache(maxsize=4)
def sync_redis(url: str) -> redis.Redis:
    return redis.Redis.from_url(
        url,
        socket_timeout=10,
        health_check_interval=30,
        retry=SyncRetry(ExponentialBackoff(cap=1.0, base=0.05), REDIS_COMMAND_RETRIES),
        retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
    )


def async_redis(url: str) -> aioredis.Redis:
    """The engine's client. A command on a connection that a Redis restart closed is sent
    again on a new one, so a slot release or a pause is not lost to a restart that is over."""
    return aioredis.Redis.from_url(
        url,
        socket_timeout=10,
        retry=AsyncRetry(ExponentialBackoff(cap=1.0, base=0.05), REDIS_COMMAND_RETRIES),
        retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
    )
