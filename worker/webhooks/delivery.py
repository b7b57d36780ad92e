"""The workers' side of the outbox: a thread per worker process that sends due notifications.

At least once: a notification is leased in SQL before its attempt and moved on only by the
holder of that lease after it. A worker killed mid-attempt leaves the lease to run out, and
any worker then sends it again, with the same `webhook-id`.
"""

from __future__ import annotations

import functools
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy.exc import SQLAlchemyError

from worker import constants, metrics
from worker.db import repository
from worker.db.base import utcnow
from worker.db.models import NotificationKind, NotificationStatus
from worker.db.session import in_transaction
from worker.settings import Settings, get_settings
from worker.webhooks.schedule import RetrySchedule
from worker.webhooks.sender import Sender, Sent

log = logging.getLogger(__name__)


def attempt_record(
    notification: repository.ClaimedNotification, sent: Sent, schedule: RetrySchedule
) -> repository.AttemptRecord:
    """What the notification becomes after this attempt: delivered, due again, or failed."""
    next_at = None
    if sent.delivered:
        outcome = NotificationStatus.DELIVERED
    else:
        next_at = schedule.next_attempt_at(notification.attempt, sent.started_at)
        outcome = NotificationStatus.FAILED if next_at is None else NotificationStatus.PENDING
    return repository.AttemptRecord(
        notification_id=notification.id,
        attempt=notification.attempt,
        started_at=sent.started_at,
        duration_ms=sent.duration_ms,
        status_code=sent.status_code,
        error=sent.error,
        outcome=outcome,
        next_attempt_at=next_at,
    )


class Deliverer:
    """Claims due notifications and makes their attempts, WEBHOOK_BATCH at a time."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._url = settings.sqlalchemy_url()
        self._schedule = settings.webhook_retry_schedule
        self._sender = Sender(settings)
        self._pool = ThreadPoolExecutor(constants.WEBHOOK_BATCH, thread_name_prefix="rerank-notify")

    def deliver_due(self) -> int:
        """One round; returns how many notifications it claimed."""
        now = utcnow()
        if not in_transaction(
            self._url, functools.partial(repository.any_notification_due, now=now)
        ):
            return 0
        claim = functools.partial(
            repository.claim_notifications,
            now=now,
            lease_s=self._settings.webhook_lease_s,
            limit=constants.WEBHOOK_BATCH,
        )
        claimed = in_transaction(self._url, claim)
        for notification, record in zip(
            claimed, self._pool.map(self._attempt, claimed), strict=True
        ):
            moved = in_transaction(
                self._url, functools.partial(repository.record_attempt, record=record)
            )
            if notification.kind == NotificationKind.WEBHOOK:
                metrics.count_webhook_attempt(record.outcome)
            log.info(
                "action=notification_attempt job=%s id=%s kind=%s attempt=%d status=%s "
                "outcome=%s%s",
                notification.job_id,
                notification.message_id,
                notification.kind,
                notification.attempt,
                record.status_code,
                record.outcome if moved else "lease_lost",
                f" error={record.error!r}" if record.error else "",
            )
        return len(claimed)

    def _attempt(self, notification: repository.ClaimedNotification) -> repository.AttemptRecord:
        if notification.attempt > self._schedule.max_attempts:
            # The worker making the last attempt died before it told how it went.
            sent = Sent(utcnow(), 0.0, False, error="no attempt left after a lost lease")
        else:
            sent = self._sender.send(notification)
        return attempt_record(notification, sent, self._schedule)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._sender.close()


class DeliveryThread(threading.Thread):
    """Polls the outbox every webhook_poll_interval_s (at once again after a full batch)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(name="rerank-notifications", daemon=True)
        self._settings = settings
        self._stop = threading.Event()

    def run(self) -> None:
        deliverer = Deliverer(self._settings)
        try:
            while not self._stop.wait(self._settings.webhook_poll_interval_s):
                try:
                    while (
                        deliverer.deliver_due() == constants.WEBHOOK_BATCH
                        and not self._stop.is_set()
                    ):
                        pass
                except (SQLAlchemyError, OSError) as exc:
                    log.warning("action=notifications_failed reason=%s", type(exc).__name__)
                except Exception:  # a bug must not end every later delivery of this worker
                    log.exception("action=notifications_crashed")
        finally:
            deliverer.close()

    def stop(self) -> None:
        self._stop.set()


_thread: DeliveryThread | None = None


def start_delivery() -> None:
    global _thread
    if _thread is None:
        _thread = DeliveryThread(get_settings())
        _thread.start()


def stop_delivery() -> None:
    global _thread
    if _thread is not None:
        _thread.stop()
        _thread = None
