"""The Celery application. Messages carry request ids only; SQL is the record."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, signals
from kombu.entity import Queue

from worker import broker, constants, logs
from worker.settings import get_settings

# On RabbitMQ the queues are quorum queues: replicated, durable, and never dropping a
# message a dead consumer held (it goes back to the queue when its channel closes).
QUORUM = {"x-queue-type": "quorum"}


def _transport_settings(url: str) -> dict[str, Any]:
    if broker.is_amqp(url):
        return {
            "task_queues": [
                Queue(name, queue_arguments=QUORUM, durable=True) for name in constants.PRIORITIES
            ],
            "task_default_queue_type": "quorum",
            "task_create_missing_queue_type": "quorum",
            # Quorum queues refuse a channel-wide prefetch: each consumer gets its own.
            "worker_detect_quorum_queues": True,
            # submit returns once RabbitMQ has the messages, not when they left the socket.
            "broker_transport_options": {"confirm_publish": True},
        }
    return {
        "task_queues": [Queue(name) for name in constants.PRIORITIES],
        # A worker fetches from the interactive queue whenever it has a message, before bulk
        # (kombu's default rotates between the queues).
        "broker_transport_options": {
            "visibility_timeout": 3600,
            "queue_order_strategy": "priority",
        },
    }


def create_app() -> Celery:
    url = broker.broker_url(get_settings())
    app = Celery("rerank_worker", broker=url, include=["worker.tasks"])
    app.conf.update(
        task_default_queue=constants.QUEUE_BULK,
        task_ignore_result=True,
        result_backend=None,
        # At-least-once: a message is acked after its task ran, and a killed worker's
        # message goes back; duplicates are harmless because requests are claimed in SQL.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        # A lost broker connection leaves running requests alone: their SQL leases guard
        # them, and a message delivered again finds them claimed.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=False,
        task_serializer="json",
        accept_content=["json"],
        **_transport_settings(url),
    )
    return app


app = create_app()


@signals.after_setup_logger.connect
@signals.after_setup_task_logger.connect
def _log_format(logger: logging.Logger, **_: Any) -> None:
    """RERANK_LOG_FORMAT=json: Celery's handlers write one JSON object per line."""
    settings = get_settings()
    if settings.log_format == "json":
        logs.use_format(logger, "json", settings.secrets())
        logging.captureWarnings(True)  # Python's warnings are log lines too, not plain text
