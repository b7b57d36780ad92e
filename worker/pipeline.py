"""Requests flow through one pipeline per worker process.

Tasks claim requests in SQL and hand them over; the asyncio engine runs them as slots
allow; a recorder thread writes outcomes in batches and keeps the leases of requests
still running. A task returns once the pipeline has room, not when its own requests are
done, so the next message arrives while these are in flight and the slots never wait on
a task's slowest request. SQL leases, not Celery acks, guard against a dead worker.

An interactive task returns at once (its requests still count in the backlog). A bulk task
waiting for room holds a Celery thread and a prefetch place; when every task thread of the
process waits so and an interactive message is queued, a lookout thread lets one of them
return, and the Celery consumer (interactive queue first) takes that message next. On
RabbitMQ the message has already reached the process (each queue's consumer has its own
prefetch) and waits for the thread that is let go (see broker.interactive_lookout).
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable

import redis
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from worker import broker, completion, constants, metrics
from worker.db import repository
from worker.db.session import in_transaction
from worker.domain import RequestOutcome, RequestWork
from worker.redis_clients import redis_url, sync_redis
from worker.runtime import Engine
from worker.service import ending
from worker.settings import Settings

log = logging.getLogger(__name__)


def record(
    session: Session, outcomes: list[RequestOutcome], jobs_still_running: set[str]
) -> set[str]:
    """Write the outcomes; complete the jobs that may have just ended, and return those that
    did. A job with another request still running in this process has not, and its last
    outcome checks again."""
    repository.record_outcomes(session, outcomes)
    return {
        job_id
        for job_id in {o.job_id for o in outcomes} - jobs_still_running
        if ending.complete_job_if_done(session, job_id)
    }


class Pipeline:
    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        *,
        max_backlog: int,
        interactive_queued: Callable[[], bool] | None = None,
        task_threads: int = 1,
    ) -> None:
        self._engine = engine
        self._url = settings.sqlalchemy_url()
        self._settings = settings
        self._lease_s = settings.request_lease_s
        self._max_backlog = max_backlog
        # Each outcome with whether it closes its batch at once (an interactive request's).
        self._outcomes: queue.Queue[tuple[RequestOutcome, bool]] = queue.Queue()
        self._running: dict[int, RequestWork] = {}
        self._room = threading.Condition()
        self._waiting = 0  # bulk tasks blocked in run() until there is room
        self._make_way = False  # one of them is to return now, for an interactive message
        self._stopping = threading.Event()
        self._recorder = threading.Thread(
            target=self._record_loop, name="rerank-recorder", daemon=True
        )
        self._recorder.start()
        if interactive_queued is not None:
            threading.Thread(
                target=self._lookout_loop,
                args=(interactive_queued, task_threads),
                name="rerank-lookout",
                daemon=True,
            ).start()

    def run(self, work: list[RequestWork]) -> None:
        """Start the requests. A bulk task then returns once fewer than `max_backlog` are
        in this process; an interactive task returns at once."""
        with self._room:
            self._running.update((w.request_id, w) for w in work)
        self._engine.start(work, self._finished)
        if any(w.priority != constants.QUEUE_INTERACTIVE for w in work):
            self._wait_for_room()

    def _wait_for_room(self) -> None:
        with self._room:
            self._waiting += 1
            try:
                self._room.wait_for(
                    lambda: len(self._running) < self._max_backlog or self._make_way
                )
            finally:
                self._waiting -= 1
            self._make_way = False

    def _lookout_loop(self, interactive_queued: Callable[[], bool], task_threads: int) -> None:
        """While every task thread waits for room, free one for a queued interactive message."""
        while not self._stopping.wait(constants.INTERACTIVE_LOOKOUT_S):
            with self._room:
                blocked = self._waiting >= task_threads and not self._make_way
            if blocked and interactive_queued():
                with self._room:
                    if self._waiting >= task_threads:
                        self._make_way = True
                        self._room.notify_all()

    def _finished(self, work: RequestWork, outcome: RequestOutcome) -> None:
        urgent = work.priority == constants.QUEUE_INTERACTIVE
        self._outcomes.put((outcome, urgent))

    def _next_batch(self) -> list[RequestOutcome]:
        """What finished in the last interval (waits for the first at most that long); an
        interactive request's outcome is written at once, with what came before it."""
        try:
            outcome, urgent = self._outcomes.get(timeout=constants.RECORD_INTERVAL_S)
        except queue.Empty:
            return []
        batch = [outcome]
        deadline = time.monotonic() + constants.RECORD_INTERVAL_S
        while not urgent and (left := deadline - time.monotonic()) > 0:
            try:
                outcome, urgent = self._outcomes.get(timeout=left)
            except queue.Empty:
                break
            batch.append(outcome)
        return batch

    def _record_loop(self) -> None:
        renewed_at = time.monotonic()
        carried: list[RequestOutcome] = []
        while not (self._stopping.is_set() and not self._running and not carried):
            batch = carried + self._next_batch()
            carried = []
            if batch:
                try:
                    write = functools.partial(
                        record, outcomes=batch, jobs_still_running=self._jobs_beside(batch)
                    )
                    ended = in_transaction(self._url, write)
                except SQLAlchemyError:
                    # The database is away longer than the retries: keep them, try again.
                    log.exception("action=record_failed requests=%d", len(batch))
                    carried = batch
                else:
                    for outcome in batch:
                        metrics.count_finished(
                            outcome.status, outcome.cache_hits, outcome.tokens_saved
                        )
                    notices: dict[str, bytes] = {}
                    with self._room:
                        for outcome in batch:
                            work = self._running.pop(outcome.request_id, None)
                            if work is not None and work.priority == constants.QUEUE_INTERACTIVE:
                                # Two of a job's requests in one batch: neither alone ended it.
                                notices[work.job_id] = (
                                    completion.ENDED
                                    if work.job_id in notices
                                    else completion.notice_body(outcome, work.model)
                                )
                        self._room.notify_all()
                    if ended and notices:
                        # A synchronous caller waits for these: tell it now they are in SQL.
                        completion.announce_ended(
                            self._notices, {j: notices[j] for j in ended & notices.keys()}
                        )
            if time.monotonic() - renewed_at > self._lease_s / 3:
                renewed_at = time.monotonic()
                self._renew_leases()

    @functools.cached_property
    def _notices(self) -> redis.Redis:
        """The Redis client for end-of-job notices; made on first use (interactive jobs only)."""
        return sync_redis(redis_url(self._settings))

    def _jobs_beside(self, batch: list[RequestOutcome]) -> set[str]:
        """The jobs of this process's running requests other than the batch's."""
        in_batch = {o.request_id for o in batch}
        with self._room:
            return {w.job_id for w in self._running.values() if w.request_id not in in_batch}

    def _renew_leases(self) -> None:
        with self._room:
            held = [(w.request_id, w.delivery) for w in self._running.values()]
        if not held:
            return
        renew = functools.partial(repository.renew_leases, held=held, lease_s=self._lease_s)
        try:
            in_transaction(self._url, renew)
        except SQLAlchemyError:
            log.exception("action=lease_renewal_failed requests=%d", len(held))

    def close(self, timeout_s: float) -> None:
        """Let running requests finish and be written (warm shutdown), then stop the engine."""
        self._stopping.set()
        self._recorder.join(timeout=timeout_s)
        self._engine.close()


_lock = threading.Lock()
_pipeline: tuple[int, Pipeline] | None = None
_interactive_threads: int | None = None


def watch_interactive(task_threads: int) -> None:
    """Say that this process's Celery worker takes interactive messages into `task_threads`
    threads (before its first task), so its bulk tasks make way for them."""
    global _interactive_threads
    _interactive_threads = task_threads


def get_pipeline(settings: Settings) -> Pipeline:
    """One pipeline, and so one engine, per process (a forked child builds its own)."""
    global _pipeline
    with _lock:
        if _pipeline is None or _pipeline[0] != os.getpid():
            slots = settings.slots_per_process
            backlog = max(constants.MIN_BACKLOG, constants.BACKLOG_PER_SLOT * slots)
            queued = None
            if _interactive_threads is not None:
                queued = broker.interactive_lookout(settings, constants.QUEUE_INTERACTIVE)
            pipeline = Pipeline(
                Engine(settings),
                settings,
                max_backlog=backlog,
                interactive_queued=queued,
                task_threads=_interactive_threads or 1,
            )
            _pipeline = (os.getpid(), pipeline)
        return _pipeline[1]


def close_pipeline(timeout_s: float) -> None:
    global _pipeline
    with _lock:
        if _pipeline is not None and _pipeline[0] == os.getpid():
            _pipeline[1].close(timeout_s)
        _pipeline = None
