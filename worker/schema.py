"""Make sure the database has the current schema before a command uses it."""

from __future__ import annotations

import fcntl
import functools
from pathlib import Path

from sqlalchemy import inspect, text
from sqlalchemy.engine import make_url

from worker import errors
from worker.db.session import get_engine

# The newest migration's revision. The check reads it here, not from the migration scripts,
# because loading them (and Alembic) costs every CLI command a tenth of a second; a test
# holds it equal to the scripts' head.
HEAD_REVISION = "0009"


def current_revision(database_url: str) -> str | None:
    """The revision Alembic recorded in the database; None before its first migration."""
    with get_engine(database_url).connect() as connection:
        if not inspect(connection).has_table("alembic_version"):
            return None
        found = connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
    return str(found) if found is not None else None


@functools.lru_cache(maxsize=4)
def ensure_schema(database_url: str) -> None:
    """SQLite databases (the embedded default) are migrated on first use; a server
    database must be migrated on purpose, with `rerank-worker db upgrade`."""
    current = current_revision(database_url)
    if current == HEAD_REVISION:
        return
    parsed = make_url(database_url)
    if parsed.get_backend_name() == "sqlite":
        from worker.db import migrate  # Alembic: only when there is a migration to run

        # Several processes (a demo, workers) may start on a new file at once.
        lock_path = Path(parsed.database or "rerank.db").with_suffix(".migrate.lock")
        with lock_path.open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            migrate.upgrade(database_url)
        return
    raise errors.ConfigError(
        f"the database is at schema revision {current or 'none'}, not {HEAD_REVISION}: "
        "run `rerank-worker db upgrade`"
    )
