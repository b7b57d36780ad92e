"""Alembic migrations; shipped inside the package as worker._migrations."""
