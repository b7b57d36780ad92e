"""What an end-of-job notice carries (worker/completion.py)."""

from __future__ import annotations

import datetime as dt

from worker import completion
from worker.domain import CallRecord, OneRequestOutcome, RequestOutcome


def call(outcome: str) -> CallRecord:
    return CallRecord("k1", "m", 200, outcome, 2, 10, 5.0, dt.datetime(2026, 12, 2))


def outcome(delivery: int) -> RequestOutcome:
    ended = RequestOutcome(request_id=7, job_id="j", status="succeeded", delivery=delivery)
    ended.results_json, ended.total_tokens = '[{"index":1,"relevance_score":0.9}]', 20
    ended.calls = [call("rate_limited"), call("ok")]
    return ended


def test_a_first_delivery_carries_its_outcome_with_its_billed_calls() -> None:
    carried = completion.carried_outcome(completion.notice_body(outcome(1), "m"))
    assert carried == OneRequestOutcome(
        status="succeeded",
        model="m",
        results_json='[{"index":1,"relevance_score":0.9}]',
        total_tokens=20,
        error_type=None,
        error_message=None,
        billed_calls=1,
    )


def test_a_later_delivery_carries_nothing_since_an_earlier_run_may_have_billed_too() -> None:
    assert completion.notice_body(outcome(2), "m") == completion.ENDED
    assert completion.carried_outcome(completion.ENDED) is None
