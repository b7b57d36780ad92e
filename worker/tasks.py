"""Thin Celery tasks: ids in, service calls out."""

from __future__ import annotations

from typing import Any

from celery import signals

from worker import service, sweeper
from worker.celery_app import app
from worker.pipeline import close_pipeline
from worker.settings import get_settings


@app.task(name="rerank.run_requests", ignore_result=True)
def run_requests(request_ids: list[int]) -> int:
    return service.run_requests(request_ids)


@signals.worker_ready.connect
def _start_sweeper(**_: Any) -> None:
    sweeper.start_sweeper()


@signals.worker_shutdown.connect
def _stop(**_: Any) -> None:
    sweeper.stop_sweeper()
    close_pipeline(timeout_s=get_settings().call_timeout_s * 2)
