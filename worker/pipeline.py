"""Requests flow through one pipeline per worker process.

Tasks claim requests in SQL and hand them over; the asyncio engine runs them as slots
allow; a recorder thread writes outcomes in batches and keeps the leases of requests
still running. A task returns once the pipeline has room, not when its own requests are
done, so the next message arrives while these are in flight and the slots never wait on
a task's slowest request. SQL leases, not Celery acks, guard against a dead worker.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import os
import queue
import threading
import time

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from worker import constants
from worker.db import repository
from worker.db.models import RequestStatus
from worker.db.session import in_transaction
from worker.domain import RequestOutcome, RequestWork
from worker.runtime import Engine
from worker.settings import Settings

log = logging.getLogger(__name__)


def outcome_of(
    future: concurrent.futures.Future[RequestOutcome], work: RequestWork
) -> RequestOutcome:
    try:
        return future.result()
    except Exception as exc:  # a bug must still end the request, never leave it stuck
        log.exception("action=request_crashed request=%s", work.request_id)
        return RequestOutcome(
            request_id=work.request_id,
            job_id=work.job_id,
            status=RequestStatus.FAILED,
            error_type="internal_error",
            error_message=f"{type(exc).__name__}: {exc}",
        )


def record(session: Session, outcomes: list[RequestOutcome]) -> None:
    repository.record_outcomes(session, outcomes)
    for job_id in {o.job_id for o in outcomes}:
        repository.complete_job_if_done(session, job_id)


class Pipeline:
    def __init__(self, engine: Engine, settings: Settings, *, max_backlog: int) -> None:
        self._engine = engine
        self._url = settings.sqlalchemy_url()
        self._lease_s = settings.request_lease_s
        self._max_backlog = max_backlog
        self._outcomes: queue.Queue[RequestOutcome] = queue.Queue()
        self._running: dict[int, RequestWork] = {}
        self._room = threading.Condition()
        self._stopping = threading.Event()
        self._recorder = threading.Thread(
            target=self._record_loop, name="rerank-recorder", daemon=True
        )
        self._recorder.start()

    def run(self, work: list[RequestWork]) -> None:
        """Start the requests; return once fewer than `max_backlog` are in this process."""
        with self._room:
            self._running.update((w.request_id, w) for w in work)
        for item in work:
            future = self._engine.submit(item)
            future.add_done_callback(functools.partial(self._finished, item))
        with self._room:
            self._room.wait_for(lambda: len(self._running) < self._max_backlog)

    def _finished(
        self, work: RequestWork, future: concurrent.futures.Future[RequestOutcome]
    ) -> None:
        self._outcomes.put(outcome_of(future, work))

    def _next_batch(self) -> list[RequestOutcome]:
        """What finished in the last interval (waits for the first at most that long)."""
        try:
            batch = [self._outcomes.get(timeout=constants.RECORD_INTERVAL_S)]
        except queue.Empty:
            return []
        deadline = time.monotonic() + constants.RECORD_INTERVAL_S
        while (left := deadline - time.monotonic()) > 0:
            try:
                batch.append(self._outcomes.get(timeout=left))
            except queue.Empty:
                break
        return batch

    def _record_loop(self) -> None:
        renewed_at = time.monotonic()
        carried: list[RequestOutcome] = []
        while not (self._stopping.is_set() and not self._running and not carried):
            batch = carried + self._next_batch()
            carried = []
            if batch:
                try:
                    in_transaction(self._url, functools.partial(record, outcomes=batch))
                except SQLAlchemyError:
                    # The database is away longer than the retries: keep them, try again.
                    log.exception("action=record_failed requests=%d", len(batch))
                    carried = batch
                else:
                    with self._room:
                        for outcome in batch:
                            self._running.pop(outcome.request_id, None)
                        self._room.notify_all()
            if time.monotonic() - renewed_at > self._lease_s / 3:
                renewed_at = time.monotonic()
                self._renew_leases()

    def _renew_leases(self) -> None:
        with self._room:
            ids = list(self._running)
        if not ids:
            return
        renew = functools.partial(repository.renew_leases, ids=ids, lease_s=self._lease_s)
        try:
            in_transaction(self._url, renew)
        except SQLAlchemyError:
            log.exception("action=lease_renewal_failed requests=%d", len(ids))

    def close(self, timeout_s: float) -> None:
        """Let running requests finish and be written (warm shutdown), then stop the engine."""
        self._stopping.set()
        self._recorder.join(timeout=timeout_s)
        self._engine.close()


_lock = threading.Lock()
_pipeline: tuple[int, Pipeline] | None = None


def get_pipeline(settings: Settings) -> Pipeline:
    """One pipeline, and so one engine, per process (a forked child builds its own)."""
    global _pipeline
    with _lock:
        if _pipeline is None or _pipeline[0] != os.getpid():
            backlog = max(constants.MIN_BACKLOG, constants.BACKLOG_PER_SLOT * settings.total_slots)
            _pipeline = (os.getpid(), Pipeline(Engine(settings), settings, max_backlog=backlog))
        return _pipeline[1]


def close_pipeline(timeout_s: float) -> None:
    global _pipeline
    with _lock:
        if _pipeline is not None and _pipeline[0] == os.getpid():
            _pipeline[1].close(timeout_s)
        _pipeline = None
