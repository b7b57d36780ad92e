"""Where Celery's broker is, and how many messages wait in a queue, on Redis or RabbitMQ.

RERANK_BROKER_URL names the broker (default: the Redis that keeps the limits). The rest of
the code asks this module, never a transport, so the sweeper and the interactive lookout
read the same on both brokers.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import amqp.exceptions
import kombu.exceptions
import redis
from kombu.connection import Connection

from worker import constants, embedded
from worker.redis_clients import redis_url, sync_redis
from worker.settings import Settings

AMQP_SCHEMES = ("amqp", "amqps", "pyamqp")
# What a broker that is away (or a connection it closed) raises, on either transport.
BROKER_ERRORS: tuple[type[Exception], ...] = (
    kombu.exceptions.OperationalError,
    amqp.exceptions.AMQPError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    OSError,
)


def broker_url(settings: Settings) -> str:
    """RERANK_BROKER_URL, or the limits' Redis in the form kombu accepts."""
    if settings.broker_url:
        return settings.broker_url
    return embedded.celery_broker_url(redis_url(settings))


def is_amqp(url: str) -> bool:
    return url.partition("://")[0] in AMQP_SCHEMES


def _redis_form(url: str) -> str:
    """kombu's `redis+socket://` is redis-py's `unix://`; other Redis URLs are the same."""
    scheme, _, rest = url.partition("://")
    return f"unix://{rest}" if scheme == "redis+socket" else url


def queued_messages(settings: Settings, queue: str) -> int:
    """Messages ready in `queue`, not counting those delivered and not yet acked (on Redis
    the list's length; on RabbitMQ a passive declare's message count). A queue that does
    not exist yet holds none."""
    url = broker_url(settings)
    if not is_amqp(url):
        return int(sync_redis(_redis_form(url)).llen(queue))
    with Connection(url, connect_timeout=5) as connection:  # type: ignore[no-untyped-call]
        channel = connection.channel()
        try:
            _, count, _ = channel.queue_declare(queue=queue, passive=True)
        except amqp.exceptions.NotFound:
            return 0
        return int(count)


def queue_depths(settings: Settings) -> dict[str, int]:
    """Messages ready in the interactive and bulk queues, whichever the broker."""
    return {queue: queued_messages(settings, queue) for queue in constants.PRIORITIES}


def queues_empty(settings: Settings, queues: tuple[str, ...]) -> bool:
    return all(queued_messages(settings, q) == 0 for q in queues)


class WaitingInteractive:
    """Interactive messages this worker process received and has not started yet.

    RabbitMQ's quorum queues give each consumer a prefetch of its own, so an interactive
    message reaches a worker even while bulk tasks hold all its threads; it then waits
    here, in the process, not in the broker (and a passive declare would not count it).
    """

    def __init__(self) -> None:
        self._ids: set[str] = set()
        self._lock = threading.Lock()

    def received(self, task_id: str) -> None:
        with self._lock:
            self._ids.add(task_id)

    def started(self, task_id: str) -> None:
        with self._lock:
            self._ids.discard(task_id)

    def any(self) -> bool:
        return bool(self._ids)


WAITING_INTERACTIVE = WaitingInteractive()


def _interactive_in_redis(client: redis.Redis, queue: str) -> bool:
    try:
        return bool(client.llen(queue))
    except redis.exceptions.RedisError:
        return False


def interactive_lookout(settings: Settings, queue: str) -> Callable[[], bool]:
    """Whether an interactive message waits for one of this process's task threads.

    On Redis a worker fetches no more than its prefetch, so the message is still in the
    broker's list; on RabbitMQ it was already delivered to this process.
    """
    url = broker_url(settings)
    if is_amqp(url):
        return WAITING_INTERACTIVE.any
    client = sync_redis(_redis_form(url))
    return lambda: _interactive_in_redis(client, queue)
