"""`/healthz`: whether this API process reaches its database and Redis (no token needed)."""

from __future__ import annotations

import functools
import logging
from typing import Any

import redis
from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from worker.api import schemas
from worker.api.deps import SettingsDep
from worker.db.session import get_engine
from worker.redis_clients import redis_url

router = APIRouter(tags=["health"])
log = logging.getLogger(__name__)

# A health check must answer within the checker's own timeout, so no retries here.
HEALTH_TIMEOUT_S = 2.0


@functools.lru_cache(maxsize=4)
def _health_redis(url: str) -> redis.Redis:
    return redis.Redis.from_url(
        url, socket_timeout=HEALTH_TIMEOUT_S, socket_connect_timeout=HEALTH_TIMEOUT_S
    )


def _database_answers(url: str) -> bool:
    try:
        with get_engine(url).connect() as connection:
            connection.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        log.warning("action=health_database_down reason=%s", type(exc).__name__)
        return False
    return True


def _redis_answers(url: str) -> bool:
    try:
        return bool(_health_redis(url).ping())
    except (redis.exceptions.RedisError, OSError) as exc:
        log.warning("action=health_redis_down reason=%s", type(exc).__name__)
        return False


@router.get(
    "/healthz",
    response_model=schemas.Health,
    responses={503: {"model": schemas.Health, "description": "Database or Redis down"}},
)
def healthz(settings: SettingsDep) -> Any:
    database = _database_answers(settings.sqlalchemy_url())
    redis_ok = _redis_answers(redis_url(settings))
    ok = database and redis_ok
    body = {"status": "ok" if ok else "unavailable", "database": database, "redis": redis_ok}
    return JSONResponse(body, status_code=200 if ok else 503)
