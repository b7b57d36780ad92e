"""The JSON log format: the message's key=value pairs as fields, secrets masked."""

from __future__ import annotations

import json
import logging
import sys

from worker import logs

SECRET = "sk-test-secret-0123456789"


def record(message: str, *args: object, exc_info: bool = False) -> logging.LogRecord:
    return logging.LogRecord(
        "worker.engine", logging.WARNING, __file__, 1, message, args,
        sys.exc_info() if exc_info else None,
    )  # fmt: skip


def test_the_pairs_of_a_message_become_fields_with_numbers_as_numbers() -> None:
    fields = logs.message_fields(
        "action=rerank_retry request=12 key=alpha status=None attempt=3 delay_s=0.250"
    )
    assert fields == {
        "action": "rerank_retry",
        "request": 12,
        "key": "alpha",
        "status": "None",
        "attempt": 3,
        "delay_s": 0.25,
    }


def test_a_message_without_pairs_has_no_fields() -> None:
    assert logs.message_fields("celery@host ready.") == {}
    assert logs.message_fields("x=1 then x=2") == {"x": 1}


def test_a_json_line_has_time_level_logger_message_and_the_pairs() -> None:
    line = logs.JsonFormatter().format(
        record("action=sweep_requeue priority=%s requests=%d", "bulk", 4)
    )
    entry = json.loads(line)
    assert entry["level"] == "WARNING" and entry["logger"] == "worker.engine"
    assert entry["message"] == "action=sweep_requeue priority=bulk requests=4"
    assert entry["action"] == "sweep_requeue" and entry["requests"] == 4
    assert entry["time"].endswith("+00:00")


def test_a_pair_named_like_a_core_field_does_not_replace_it() -> None:
    entry = json.loads(logs.JsonFormatter().format(record("level=low message=hi")))
    assert entry["level"] == "WARNING"
    assert entry["message"] == "level=low message=hi"


def test_secrets_are_masked_in_the_message_and_the_traceback() -> None:
    formatter = logs.JsonFormatter([SECRET])
    try:
        raise ValueError(f"upstream echoed {SECRET}")
    except ValueError:
        line = formatter.format(record("action=oops detail=%s", SECRET, exc_info=True))
    assert SECRET not in line
    entry = json.loads(line)
    assert entry["detail"] == logs.MASK and logs.MASK in entry["exception"]


def test_the_text_format_masks_secrets_too() -> None:
    line = logs.formatter("text", [SECRET]).format(record("key said %s", SECRET))
    assert SECRET not in line and logs.MASK in line
