"""The migrations build exactly the schema the models describe, on SQLite and PostgreSQL."""

from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from worker.db import migrate
from worker.db.models import Base
from worker.db.session import get_engine


def schema_differences(url: str) -> list[object]:
    with get_engine(url).connect() as connection:
        return list(compare_metadata(MigrationContext.configure(connection), Base.metadata))


def test_the_migrated_schema_matches_the_models(database_url: str) -> None:
    assert schema_differences(database_url) == []


def test_the_newest_migration_goes_down_and_up_again(database_url: str) -> None:
    config = migrate.alembic_config(database_url)
    command.downgrade(config, "-1")
    assert schema_differences(database_url) != []
    command.upgrade(config, "head")
    assert schema_differences(database_url) == []
