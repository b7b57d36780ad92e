"""Every error of the API as one JSON shape, `{"error": {"type", "message", ...}}`.

The project's exceptions are translated here, at the edge: bad input (a body line, a
parameter) is 400 with the line and field, a job outside the caller's scope 404, a database
or Redis that does not answer 503.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

import psycopg
import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, SQLAlchemyError
from starlette.exceptions import HTTPException

from worker import errors

log = logging.getLogger(__name__)

ERROR_TYPES = {
    400: "invalid_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media_type",
    503: "unavailable",
}


def error_response(
    status: int, message: str, headers: Mapping[str, str] | None = None, **extra: Any
) -> JSONResponse:
    kind = ERROR_TYPES.get(status, HTTPStatus(status).phrase.lower().replace(" ", "_"))
    return JSONResponse(
        {"error": {"type": kind, "message": message, **extra}}, status_code=status, headers=headers
    )


def _input_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, errors.InputError)
    return error_response(400, str(exc), line=exc.line, field=exc.field)


def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    """FastAPI's parameter checks: the first problem, naming the parameter."""
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {}
    location = [str(part) for part in first.get("loc", ())]
    name = location[-1] if location else None
    where = f"{location[0]} parameter '{name}'" if len(location) > 1 else "request"
    message = f"{where}: {first.get('msg', 'invalid')}"
    return error_response(400, message, line=None, field=name)


def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    return error_response(exc.status_code, str(exc.detail), exc.headers)


def _not_found(_: Request, exc: Exception) -> JSONResponse:
    return error_response(404, str(exc))


def _unavailable(_: Request, exc: Exception) -> JSONResponse:
    log.warning("action=api_unavailable reason=%s", type(exc).__name__)
    return error_response(503, f"storage unavailable ({type(exc).__name__})")


def _refused_value(_: Request, exc: Exception) -> JSONResponse:
    """A value the database cannot store is bad input, even when no check foresaw it (a
    COPY raises psycopg's own error, not SQLAlchemy's)."""
    reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
    return error_response(400, f"the database refused a value: {reason}", line=None, field=None)


def install(app: FastAPI) -> None:
    app.add_exception_handler(errors.InputError, _input_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(errors.JobNotFound, _not_found)
    app.add_exception_handler(DataError, _refused_value)
    app.add_exception_handler(psycopg.DataError, _refused_value)
    app.add_exception_handler(SQLAlchemyError, _unavailable)
    app.add_exception_handler(redis.exceptions.ConnectionError, _unavailable)
