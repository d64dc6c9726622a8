"""The schema: migrations apply on both databases and match the models exactly."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from gpulocker import scheduling_models  # noqa: F401  (its tables join Base.metadata)
from gpulocker.db import Database, current_revision, head_revision
from gpulocker.models import Base


def test_migrations_match_the_models(database_url: str) -> None:
    database = Database(database_url)
    try:
        assert current_revision(database.engine) == head_revision()
        with database.engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == []
    finally:
        database.dispose()


def test_upgrade_is_safe_to_run_again(database_url: str) -> None:
    database = Database(database_url)
    try:
        database.upgrade()
        database.upgrade()
        assert current_revision(database.engine) == head_revision()
    finally:
        database.dispose()
