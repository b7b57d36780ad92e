"""The Celery application. Messages carry request ids only; SQL is the record."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, signals
from kombu.entity import Queue

from worker import constants, embedded, logs
from worker.redis_clients import redis_url
from worker.settings import get_settings


def create_app() -> Celery:
    settings = get_settings()
    broker = embedded.celery_broker_url(redis_url(settings))
    app = Celery("rerank_worker", broker=broker, include=["worker.tasks"])
    app.conf.update(
        task_queues=[Queue(constants.QUEUE_INTERACTIVE), Queue(constants.QUEUE_BULK)],
        task_default_queue=constants.QUEUE_BULK,
        task_ignore_result=True,
        result_backend=None,
        # At-least-once: a message is acked after its task ran, and a killed worker's
        # message goes back; duplicates are harmless because requests are claimed in SQL.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        # A worker fetches from the interactive queue whenever it has a message, before bulk
        # (kombu's default rotates between the queues).
        broker_transport_options={"visibility_timeout": 3600, "queue_order_strategy": "priority"},
        worker_hijack_root_logger=False,
        task_serializer="json",
        accept_content=["json"],
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
