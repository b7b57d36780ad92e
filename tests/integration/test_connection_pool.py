"""The PostgreSQL pool pings a connection only after it sat idle (worker/db/session.py): one
whose server process ended meanwhile is replaced before use, and one in steady use costs no
round trip."""

from __future__ import annotations

import time

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from worker.db.session import PING_AFTER_IDLE_S, get_engine


def backend_pid(url: str) -> int:
    with get_engine(url).connect() as connection:
        pid = connection.execute(text("SELECT pg_backend_pid()")).scalar_one()
    return int(pid)


def test_an_idle_connection_whose_server_process_ended_is_replaced(postgres_url: str) -> None:
    first = backend_pid(postgres_url)
    plain = make_url(postgres_url).set(drivername="postgresql").render_as_string(False)
    with psycopg.connect(plain, autocommit=True) as other:
        other.execute("SELECT pg_terminate_backend(%s)", (first,))
    time.sleep(PING_AFTER_IDLE_S * 1.2)  # the idle time is what is tested
    assert backend_pid(postgres_url) != first


def test_a_connection_in_steady_use_is_not_pinged(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    dialect = get_engine(postgres_url).dialect
    pings: list[object] = []
    ping = dialect.do_ping

    def counted(connection: object) -> bool:
        pings.append(connection)
        return ping(connection)

    monkeypatch.setattr(dialect, "do_ping", counted)
    pids = {backend_pid(postgres_url) for _ in range(20)}
    assert len(pids) == 1
    assert pings == []
