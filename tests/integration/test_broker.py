"""The broker seen the same way on Redis and RabbitMQ: where it is and what waits in it."""

from __future__ import annotations

from typing import Any

from conftest import BOTH_BROKERS, Broker, Env

from worker import celery_app, constants
from worker.broker import broker_url, is_amqp, queued_messages, queues_empty
from worker.settings import Settings, get_settings


def test_broker_url_defaults_to_the_limits_redis_and_takes_rabbitmq_when_named() -> None:
    redis_only = Settings(redis_url="unix:///run/r.sock")  # type: ignore[call-arg]
    assert broker_url(redis_only) == "redis+socket:///run/r.sock"
    rabbit = Settings(redis_url="redis://r:6379/0", broker_url="amqp://u:p@mq:5672/v")  # type: ignore[call-arg]
    assert broker_url(rabbit) == "amqp://u:p@mq:5672/v"
    assert is_amqp("amqp://mq//") and is_amqp("amqps://mq//")
    assert not is_amqp("redis://r:6379/0")


@BOTH_BROKERS
def test_queued_messages_counts_what_waits_in_each_queue(
    make_env: Any, broker: Broker, sqlite_url: str
) -> None:
    env: Env = make_env(sqlite_url)
    settings = get_settings()
    assert queued_messages(settings, constants.QUEUE_BULK) == 0  # not declared yet
    app = celery_app.create_app()
    for ids in ([1], [2], [3]):
        app.send_task(constants.RUN_REQUESTS_TASK, args=[ids], queue=constants.QUEUE_BULK)
    app.send_task(constants.RUN_REQUESTS_TASK, args=[[4]], queue=constants.QUEUE_INTERACTIVE)
    assert queued_messages(settings, constants.QUEUE_BULK) == 3
    assert queued_messages(settings, constants.QUEUE_INTERACTIVE) == 1
    assert not queues_empty(settings, constants.PRIORITIES)
    if env.values.get("RERANK_BROKER_URL"):
        assert broker.queued(constants.QUEUE_BULK) == 3
    app.close()
