"""Apply the Alembic migrations shipped with the package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from alembic import command
from alembic.config import Config


def _script_location() -> str:
    spec = importlib.util.find_spec("worker._migrations")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the migrations package worker._migrations is not installed")
    return str(Path(next(iter(spec.submodule_search_locations))))


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", _script_location())
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)
