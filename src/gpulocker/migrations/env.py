"""Alembic environment: runs on the connection handed in by `gpulocker.db.upgrade`."""

from __future__ import annotations

from alembic import context

from gpulocker import scheduling_models  # noqa: F401  (its tables join Base.metadata)
from gpulocker.db import make_engine
from gpulocker.models import Base

target_metadata = Base.metadata


def run_migrations() -> None:
    """Migrate the given connection, or the URL in `sqlalchemy.url` (alembic CLI use)."""
    connection = context.config.attributes.get("connection")
    if connection is not None:
        context.configure(
            connection=connection, target_metadata=target_metadata, render_as_batch=True
        )
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_engine(context.config.get_main_option("sqlalchemy.url") or "")
    with engine.begin() as conn:
        context.configure(connection=conn, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()


run_migrations()
