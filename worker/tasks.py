"""Thin Celery tasks: ids in, service calls out."""

from __future__ import annotations

from typing import Any

from celery import signals

from worker import constants, pipeline, sweeper
from worker.celery_app import app
from worker.service import run
from worker.settings import get_settings
from worker.webhooks import delivery


@app.task(name=constants.RUN_REQUESTS_TASK, ignore_result=True)
def run_requests(request_ids: list[int]) -> int:
    return run.run_requests(request_ids)


@signals.worker_ready.connect
def _start_sweeper(**_: Any) -> None:
    sweeper.start_sweeper()


@signals.worker_ready.connect
def _start_notifications(**_: Any) -> None:
    delivery.start_delivery()


@signals.worker_ready.connect
def _watch_interactive(sender: Any, **_: Any) -> None:
    """A worker that takes interactive messages must not have every thread held by bulk."""
    queues = {queue.name for queue in sender.task_consumer.queues}
    if constants.QUEUE_INTERACTIVE in queues:
        pipeline.watch_interactive(task_threads=sender.pool.num_processes)


@signals.worker_shutdown.connect
def _stop(**_: Any) -> None:
    sweeper.stop_sweeper()
    delivery.stop_delivery()
    pipeline.close_pipeline(timeout_s=get_settings().call_timeout_s * 2)
