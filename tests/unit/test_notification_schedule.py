"""The retry schedule of notifications, and what an attempt makes of one (pure logic)."""

from __future__ import annotations

import datetime as dt

import pytest
from pydantic import ValidationError

from worker import constants, errors
from worker.db.models import NotificationStatus
from worker.db.repository import ClaimedNotification
from worker.settings import Settings
from worker.webhooks import signing
from worker.webhooks.delivery import attempt_record
from worker.webhooks.schedule import RetrySchedule
from worker.webhooks.sender import Sent

NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def test_the_default_schedule_retries_first_within_10_s_then_grows_for_10_attempts() -> None:
    schedule = Settings().webhook_retry_schedule
    delays = [schedule.delay_after(n) for n in range(1, 10)]
    assert all(d is not None for d in delays)
    seconds = [d.total_seconds() for d in delays if d is not None]
    assert 0 < seconds[0] <= 10
    assert seconds == sorted(seconds)
    assert seconds[:5] == [5, 300, 1800, 7200, 18000]
    assert schedule.max_attempts == constants.DEFAULT_WEBHOOK_MAX_ATTEMPTS == 10
    assert schedule.delay_after(10) is None


def test_the_last_step_repeats_until_attempts_run_out() -> None:
    schedule = RetrySchedule.parse("1, 2.5", max_attempts=5)
    assert [schedule.delay_after(n) for n in range(1, 6)] == [
        dt.timedelta(seconds=1),
        dt.timedelta(seconds=2.5),
        dt.timedelta(seconds=2.5),
        dt.timedelta(seconds=2.5),
        None,
    ]
    assert schedule.next_attempt_at(1, NOW) == NOW + dt.timedelta(seconds=1)
    assert schedule.next_attempt_at(5, NOW) is None


@pytest.mark.parametrize("text", ["", "5,x", "-1", " , "])
def test_a_bad_schedule_is_a_config_error(text: str) -> None:
    with pytest.raises(errors.ConfigError, match="RERANK_WEBHOOK_RETRY_SCHEDULE_S"):
        RetrySchedule.parse(text, max_attempts=3)


def test_settings_refuse_a_webhook_secret_not_in_the_specifications_form() -> None:
    with pytest.raises(ValidationError, match="whsec_"):
        Settings(webhook_secret="not-a-whsec-secret")


def claimed(attempt: int) -> ClaimedNotification:
    return ClaimedNotification(
        id=1, job_id="j", message_id="msg_1", kind="webhook", target="http://x/",
        queue=None, payload="{}", attempt=attempt, secret=None,
    )  # fmt: skip


def test_an_attempt_moves_the_notification_on_by_the_schedule() -> None:
    schedule = RetrySchedule.parse("5,300", max_attempts=3)
    ok = attempt_record(claimed(2), Sent(NOW, 12.0, True, 204), schedule)
    assert (ok.outcome, ok.next_attempt_at, ok.status_code) == (
        NotificationStatus.DELIVERED, None, 204,
    )  # fmt: skip
    again = attempt_record(claimed(1), Sent(NOW, 12.0, False, 500, "answered HTTP 500"), schedule)
    assert again.outcome == NotificationStatus.PENDING
    assert again.next_attempt_at == NOW + dt.timedelta(seconds=5)
    last = attempt_record(claimed(3), Sent(NOW, 12.0, False, None, "timeout"), schedule)
    assert (last.outcome, last.next_attempt_at) == (NotificationStatus.FAILED, None)


def test_signed_headers_verify_with_the_standardwebhooks_library() -> None:
    from standardwebhooks import Webhook

    now = dt.datetime.now(dt.UTC)
    body = '{"type":"job.completed","data":{"id":"é"}}'
    headers = signing.signed_headers(SECRET, "msg_abc", body, now)
    assert headers["webhook-id"] == "msg_abc"
    assert headers["webhook-timestamp"] == str(int(now.timestamp()))
    assert headers["webhook-signature"].startswith("v1,")
    assert Webhook(SECRET).verify(body.encode(), headers) == {
        "type": "job.completed",
        "data": {"id": "é"},
    }
