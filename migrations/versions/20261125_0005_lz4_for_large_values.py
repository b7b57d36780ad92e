"""lz4 for the large values on PostgreSQL (documents, results): pglz tried each image
document, mostly in vain, at a third of lz4's speed

Written by hand: autogenerate does not see a column's compression. SQLite compresses
nothing, and a PostgreSQL built without lz4 keeps its default (the ALTER fails there with
feature_not_supported, which is caught). Only values written afterwards are affected.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25 23:05:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LARGE_VALUES = (("document", "content"), ("request", "results_json"))


def _set_compression(method: str) -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql" or bind.dialect.server_version_info < (14,):
        return
    for table, column in LARGE_VALUES:
        op.execute(
            "DO $$ BEGIN "
            f"ALTER TABLE {table} ALTER COLUMN {column} SET COMPRESSION {method}; "
            "EXCEPTION WHEN feature_not_supported THEN "
            f"RAISE NOTICE '{table}.{column} keeps its compression: %', SQLERRM; "
            "END $$"
        )


def upgrade() -> None:
    _set_compression("lz4")


def downgrade() -> None:
    _set_compression("default")
