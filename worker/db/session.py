"""One engine and session factory per database URL and process."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DisconnectionError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from tenacity import retry, retry_if_exception_type, stop_after_delay, wait_random_exponential

T = TypeVar("T")


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets readers (status, results) run beside the workers' writes; the busy
    # timeout makes concurrent writers from several processes wait instead of failing.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


# A pooled connection idle longer than this is pinged before use (a database restart while it
# sat in the pool would otherwise fail its next statement); one in steady use is not.
PING_AFTER_IDLE_S = 1.0


def _ping_idle_connections(engine: Engine) -> None:
    """pool_pre_ping, but only for connections that sat idle: it costs a round trip per
    checkout, about a tenth of a synchronous rerank's own overhead, in the transactions
    every call makes. A connection that breaks while in steady use fails its statement
    instead, which in_transaction retries on a new one. Raising DisconnectionError at
    checkout makes the pool replace the connection (SQLAlchemy's pool events)."""

    @event.listens_for(engine, "checkin")
    def _idle_from(_dbapi_connection: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping_if_idle(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.get("idle_since")
        if idle_since is None or time.monotonic() - idle_since < PING_AFTER_IDLE_S:
            return
        try:
            alive = engine.dialect.do_ping(dbapi_connection)
        except engine.dialect.loaded_dbapi.Error as exc:
            raise DisconnectionError(str(exc)) from exc
        if not alive:
            raise DisconnectionError("the connection did not answer a ping")


@functools.lru_cache(maxsize=8)
def get_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    engine = create_engine(url, pool_size=10, max_overflow=20)
    _ping_idle_connections(engine)
    return engine


@functools.lru_cache(maxsize=8)
def get_sessionmaker(url: str) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url), expire_on_commit=False)


# Database restarts and lock timeouts are waited out rather than failing a paid-for result.
_db_retry = retry(
    retry=retry_if_exception_type(OperationalError),
    wait=wait_random_exponential(multiplier=0.2, max=5),
    stop=stop_after_delay(120),
    reraise=True,
)


@_db_retry
def in_transaction(url: str, fn: Callable[[Session], T]) -> T:
    """Run `fn` in one transaction, again from the start if the database went away."""
    with get_sessionmaker(url).begin() as session:
        return fn(session)
