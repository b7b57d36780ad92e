"""Make one attempt at a notification: POST a signed webhook, or publish a Celery callback."""

from __future__ import annotations

import datetime as dt
import json
import time
from dataclasses import dataclass

import httpx
import kombu.exceptions
import redis
from standardwebhooks.webhooks import EmptyWebhookSecretError

from worker import errors
from worker.db.models import NotificationKind
from worker.db.repository import ClaimedNotification
from worker.settings import Settings
from worker.webhooks import signing, targets

USER_AGENT = "rerank-worker-webhooks"
# Longest error text kept per attempt.
MAX_ERROR_CHARS = 500


@dataclass(frozen=True)
class Sent:
    """One attempt's result: delivered, or the status code and/or error that say why not."""

    started_at: dt.datetime
    duration_ms: float
    delivered: bool
    status_code: int | None = None
    error: str | None = None


class Sender:
    """One HTTP client per worker process (connection reuse), shared by the delivery threads.

    Redirects are not followed: a public URL answering 3xx towards an internal one would
    step around the address check.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._http = httpx.Client(
            timeout=settings.webhook_timeout_s,
            follow_redirects=False,
            headers={"user-agent": USER_AGENT, "content-type": "application/json"},
        )

    def close(self) -> None:
        self._http.close()

    def send(self, notification: ClaimedNotification) -> Sent:
        started_at = dt.datetime.now(dt.UTC)
        clock = time.perf_counter()
        if notification.kind == NotificationKind.CELERY:
            status_code, error = None, self._publish(notification)
        else:
            status_code, error = self._post(notification, started_at)
        duration_ms = (time.perf_counter() - clock) * 1000
        delivered = error is None and (status_code is None or 200 <= status_code < 300)
        if not delivered and error is None:
            error = f"answered HTTP {status_code}"
        return Sent(started_at, duration_ms, delivered, status_code, _clip(error))

    def _post(
        self, notification: ClaimedNotification, now: dt.datetime
    ) -> tuple[int | None, str | None]:
        secret = notification.secret or self._secret()
        if secret is None:
            return None, "no signing secret: RERANK_WEBHOOK_SECRET is not set on this worker"
        url = notification.target
        if not self._settings.webhook_allow_private:
            # Checked again at each attempt: the name may resolve elsewhere than at submit.
            try:
                refused = targets.refused_address(url)
            except errors.InputError as exc:
                return None, exc.reason
            if refused is not None:
                return None, f"refused: the host resolves to {refused}, not a public address"
        try:
            headers = signing.signed_headers(
                secret, notification.message_id, notification.payload, now
            )
        except (ValueError, EmptyWebhookSecretError):
            return None, "the signing secret is not 'whsec_' followed by base64"
        try:
            response = self._http.post(url, content=notification.payload.encode(), headers=headers)
        except httpx.TimeoutException:
            return None, f"timeout after {self._settings.webhook_timeout_s:g}s"
        except httpx.HTTPError as exc:
            return None, f"connection: {type(exc).__name__}: {exc}"
        return response.status_code, None

    def _secret(self) -> str | None:
        secret = self._settings.webhook_secret
        return None if secret is None else secret.get_secret_value()

    @staticmethod
    def _publish(notification: ClaimedNotification) -> str | None:
        """Publish TASK(job_id, status) by name on the workers' broker; the message id is
        the Celery task id, so a consumer can drop a duplicate."""
        from worker.celery_app import app

        try:
            app.send_task(
                notification.target,
                args=json.loads(notification.payload),
                queue=notification.queue,
                task_id=notification.message_id,
                retry=False,
            )
        except (kombu.exceptions.OperationalError, redis.exceptions.RedisError, OSError) as exc:
            return f"publish: {type(exc).__name__}: {exc}"
        return None


def _clip(text: str | None) -> str | None:
    return None if text is None else text[:MAX_ERROR_CHARS]
