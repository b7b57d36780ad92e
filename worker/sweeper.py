"""The safety net that makes SQL, not the broker, the record of what still has to run."""

from __future__ import annotations

import datetime as dt
import functools
import logging
import threading

import redis
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from worker import broker, constants, keystate, metrics
from worker.db import repository
from worker.db.base import utcnow
from worker.db.session import in_transaction
from worker.redis_clients import redis_url, sync_redis
from worker.service import ending
from worker.service.submit import publish
from worker.settings import Settings, get_settings

log = logging.getLogger(__name__)
# A sweep that meets one of these is skipped; the next one tries again.
SWEEP_ERRORS: tuple[type[Exception], ...] = (
    redis.exceptions.RedisError,
    SQLAlchemyError,
    *broker.BROKER_ERRORS,
)

UNSTORED_REASON = "the submit stopped before the whole file was stored; submit it again"


def sweep_once(settings: Settings) -> int:
    """Re-enqueue what no worker holds any more; complete jobs with nothing pending.

    A job whose submit stopped storing it (its storing lease ran out) is failed. Expired
    leases (a dead worker's requests) go back to the queue at once; queued
    requests whose message is old are re-sent when the queues are empty (the broker
    lost them: a flush, a restart without persistence, a submit while it was down).
    """
    now = utcnow()
    stale_before = now - dt.timedelta(seconds=settings.dispatch_stale_s)

    def find(session: Session) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
        for job_id in repository.unstored_jobs(session, now):
            log.warning("action=unstored_job_failed job=%s", job_id)
            ending.fail_unstored_job(session, job_id, UNSTORED_REASON)
        expired = repository.requeue_expired(session, now)
        queues_empty = broker.queues_empty(settings, constants.PRIORITIES)
        stale = repository.stale_queued(session, stale_before) if queues_empty else []
        for job_id in repository.unfinished_job_ids(session):
            ending.complete_job_if_done(session, job_id)
        return expired, stale

    expired, stale = in_transaction(settings.sqlalchemy_url(), find)
    if expired:
        metrics.SWEEPER_REQUEUED.labels("expired_lease").inc(len(expired))
    if stale:
        metrics.SWEEPER_REQUEUED.labels("lost_message").inc(len(stale))
    found = expired + stale
    by_priority: dict[str, list[int]] = {}
    for request_id, priority in found:
        by_priority.setdefault(priority, []).append(request_id)
    for priority, ids in by_priority.items():
        log.warning("action=sweep_requeue priority=%s requests=%d", priority, len(ids))
        unique = sorted(set(ids))
        publish(unique, priority)
        in_transaction(
            settings.sqlalchemy_url(), functools.partial(repository.mark_enqueued, ids=unique)
        )
    return len(found)


class Sweeper(threading.Thread):
    """One sweep at a time across all workers (a Redis lock), every sweep_interval_s."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(name="rerank-sweeper", daemon=True)
        self._settings = settings
        self._stop = threading.Event()

    def run(self) -> None:
        client = sync_redis(redis_url(self._settings))
        interval_s = self._settings.sweep_interval_s
        self._publish_keys(client)
        while not self._stop.wait(interval_s):
            self._publish_keys(client)
            try:
                if client.set(constants.SWEEPER_LOCK_KEY, "1", nx=True, px=int(interval_s * 900)):
                    sweep_once(self._settings)
            except SWEEP_ERRORS as exc:
                log.warning("action=sweep_failed reason=%s", type(exc).__name__)
            except Exception:  # the sweeper is the safety net: it must outlive any bug
                log.exception("action=sweep_crashed")

    def _publish_keys(self, client: redis.Redis) -> None:
        """For the displays of processes that hold no key (the API's metrics, dashboard)."""
        try:
            keystate.publish(client, self._settings.keys)
        except redis.exceptions.RedisError as exc:
            log.warning("action=keys_unpublished reason=%s", type(exc).__name__)

    def stop(self) -> None:
        self._stop.set()


_sweeper: Sweeper | None = None


def start_sweeper() -> None:
    global _sweeper
    if _sweeper is None:
        _sweeper = Sweeper(get_settings())
        _sweeper.start()


def stop_sweeper() -> None:
    global _sweeper
    if _sweeper is not None:
        _sweeper.stop()
        _sweeper = None
