"""Log lines as text (`action=... key=...`) or, with RERANK_LOG_FORMAT=json, one JSON object each.

The project logs with a stable `action` and key=value pairs in the message. The JSON form
keeps the message and makes each pair a field, beside `time`, `level` and `logger`, so a log
shipper needs no parsing rule. Secrets never appear in either form: the configured upstream
secrets are masked in whatever a message or a traceback says.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import sys
from collections.abc import Iterable, Sequence
from typing import Any

FORMATS = ("text", "json")
TEXT_FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] %(name)s: %(message)s"
MASK = "***"
# A pair of the message: a lower-case name, '=', and a value up to the next space.
_PAIR = re.compile(r"(?:^|\s)([a-z_][a-z0-9_]*)=(\S+)")
_CORE_FIELDS = ("time", "level", "logger", "message")


def _value(text: str) -> Any:
    """Numbers as numbers; everything else as the text it was."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return text
    return number if number == number and abs(number) != float("inf") else text


def message_fields(message: str) -> dict[str, Any]:
    """The key=value pairs of a message (the first of a name wins)."""
    fields: dict[str, Any] = {}
    for match in _PAIR.finditer(message):
        fields.setdefault(match.group(1), _value(match.group(2)))
    return fields


def _mask(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, MASK)
    return text


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, the message's pairs."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._secrets = tuple(s for s in secrets if s)

    def format(self, record: logging.LogRecord) -> str:
        message = _mask(record.getMessage(), self._secrets)
        entry: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": message,
        }
        for name, value in message_fields(message).items():
            if name not in _CORE_FIELDS:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = _mask(self.formatException(record.exc_info), self._secrets)
        elif record.exc_text:
            entry["exception"] = _mask(record.exc_text, self._secrets)
        return json.dumps(entry, ensure_ascii=False, default=str)


class MaskingFormatter(logging.Formatter):
    """The text format, with the secrets masked as in the JSON one."""

    def __init__(self, fmt: str | None, secrets: Iterable[str] = ()) -> None:
        super().__init__(fmt)
        self._secrets = tuple(s for s in secrets if s)

    def format(self, record: logging.LogRecord) -> str:
        return _mask(super().format(record), self._secrets)


def formatter(log_format: str, secrets: Iterable[str] = ()) -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter(secrets)
    return MaskingFormatter(TEXT_FORMAT, secrets)


def use_format(logger: logging.Logger, log_format: str, secrets: Iterable[str] = ()) -> None:
    """Give every handler of `logger` the format (Celery set the handlers up)."""
    chosen = formatter(log_format, secrets)
    for handler in logger.handlers:
        handler.setFormatter(chosen)


def configure(log_format: str, level: str, secrets: Iterable[str] = ()) -> None:
    """Logging of a process that Celery does not set up (the worker's supervisor, the API)."""
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler(sys.stderr))
    root.setLevel(level.upper())
    use_format(root, log_format, secrets)
    logging.captureWarnings(log_format == "json")
