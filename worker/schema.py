"""Make sure the database has the current schema before a command uses it."""

from __future__ import annotations

import fcntl
import functools
from pathlib import Path

from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import make_url

from worker import errors
from worker.db import migrate
from worker.db.session import get_engine


@functools.lru_cache(maxsize=4)
def ensure_schema(database_url: str) -> None:
    """SQLite databases (the embedded default) are migrated on first use; a server
    database must be migrated on purpose, with `rerank-worker db upgrade`."""
    head = ScriptDirectory.from_config(migrate.alembic_config(database_url)).get_current_head()
    with get_engine(database_url).connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
    if current == head:
        return
    parsed = make_url(database_url)
    if parsed.get_backend_name() == "sqlite":
        # Several processes (a demo, workers) may start on a new file at once.
        lock_path = Path(parsed.database or "rerank.db").with_suffix(".migrate.lock")
        with lock_path.open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            migrate.upgrade(database_url)
        return
    raise errors.ConfigError(
        f"the database is at schema revision {current or 'none'}, not {head}: "
        "run `rerank-worker db upgrade`"
    )
