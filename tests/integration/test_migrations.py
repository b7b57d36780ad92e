"""The migrations build exactly the schema the models describe, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text

from worker import schema
from worker.db import migrate
from worker.db.models import Base
from worker.db.session import get_engine

# SQLite's reflection cannot see expression indexes (job's per-tenant idempotency key);
# migration 0006 writes that one by hand, and PostgreSQL compares it.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Skipped unsupported reflection of expression-based index"),
    pytest.mark.filterwarnings("ignore:autogenerate skipping metadata-specified expression-based"),
]


def schema_differences(url: str) -> list[object]:
    with get_engine(url).connect() as connection:
        return list(compare_metadata(MigrationContext.configure(connection), Base.metadata))


def test_the_migrated_schema_matches_the_models(database_url: str) -> None:
    assert schema_differences(database_url) == []


def test_every_migration_goes_down_and_up_again(database_url: str) -> None:
    config = migrate.alembic_config(database_url)
    command.downgrade(config, "base")
    assert schema_differences(database_url) != []
    command.upgrade(config, "head")
    assert schema_differences(database_url) == []


def compression(url: str) -> dict[str, str]:
    """The compression method of each large column: 'l' for lz4, '' for the default."""
    query = text(
        "SELECT attrelid::regclass || '.' || attname, attcompression::text FROM pg_attribute "
        "WHERE (attrelid, attname) IN (('document'::regclass, 'content'), "
        "('request'::regclass, 'results_json'))"
    )
    with get_engine(url).connect() as connection:
        return {name: method for name, method in connection.execute(query).all()}


def test_large_values_are_compressed_with_lz4_on_postgresql(postgres_url: str) -> None:
    """Autogenerate does not see a column's compression, so the check above cannot either."""
    lz4 = {"document.content": "l", "request.results_json": "l"}
    assert compression(postgres_url) == lz4
    config = migrate.alembic_config(postgres_url)
    command.downgrade(config, "0004")
    assert compression(postgres_url) == {name: "" for name in lz4}
    command.upgrade(config, "head")
    assert compression(postgres_url) == lz4


def test_the_schema_check_knows_the_newest_migration(database_url: str) -> None:
    """`ensure_schema` reads the head from a constant, not from the scripts."""
    config = migrate.alembic_config(database_url)
    assert ScriptDirectory.from_config(config).get_current_head() == schema.HEAD_REVISION
    assert schema.current_revision(database_url) == schema.HEAD_REVISION
    command.downgrade(config, "-1")
    assert schema.current_revision(database_url) not in (None, schema.HEAD_REVISION)
    command.downgrade(config, "base")
    assert schema.current_revision(database_url) is None
