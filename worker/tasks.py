"""Thin Celery tasks: ids in, service calls out."""

from __future__ import annotations

from typing import Any

from celery import signals

from worker import broker, constants, pipeline, sweeper
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


@signals.worker_ready.connect
def _build_pipeline(**_: Any) -> None:
    """The engine (its event loop, HTTP client and key pool) is made before the first task,
    not by it: a job's first call came a third of a second later otherwise. After
    _watch_interactive, whose answer the pipeline takes."""
    pipeline.get_pipeline(get_settings())


@signals.task_received.connect
def _interactive_received(request: Any, **_: Any) -> None:
    if (request.delivery_info or {}).get("routing_key") == constants.QUEUE_INTERACTIVE:
        broker.WAITING_INTERACTIVE.received(request.id)


@signals.task_prerun.connect
def _task_started(task_id: str, **_: Any) -> None:
    broker.WAITING_INTERACTIVE.started(task_id)


@signals.task_revoked.connect
def _task_revoked(request: Any, **_: Any) -> None:
    broker.WAITING_INTERACTIVE.started(request.id)


@signals.worker_shutdown.connect
def _stop(**_: Any) -> None:
    sweeper.stop_sweeper()
    delivery.stop_delivery()
    pipeline.close_pipeline(timeout_s=get_settings().call_timeout_s * 2)
