"""What the benchmarks share: a throw-away PostgreSQL database and the percentile they
all print. Each benchmark runs as `.venv/bin/python bench/<name>.py`, so this folder is
on the path."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"  # the server's admin database


@contextmanager
def postgres_database(admin_url: str = POSTGRES) -> Iterator[str]:
    """A new, empty database on the server of `admin_url`, dropped afterwards (even with
    connections still open to it); yields its URL."""
    admin = admin_url.replace("postgresql+psycopg://", "postgresql://")
    name = f"glbench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def pct(values: list[float], q: float) -> float:
    """The `q` quantile (0..1) of `values`, nearest rank, in their own unit."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]
