"""A refused request takes no write lock, so a flood of hopeless requests cannot stall the
agent's enforcement loop on SQLite (SPEC §12)."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator

import pytest

from gpulocker import allocations
from gpulocker.config import Settings
from gpulocker.db import Database
from gpulocker.errors import Invalid, NotEnoughGPUs
from tests.helpers import ALICE, BOB

PATIENCE = 5.0  # far below SQLite's 30 s busy timeout: waiting for the lock would show


@pytest.fixture
def writer_busy(settings: Settings, db: Database) -> Iterator[None]:
    """Another process holds SQLite's write lock (as the agent does while it writes)."""
    if not settings.database_url.startswith("sqlite"):
        pytest.skip("the write lock is SQLite's")
    conn = sqlite3.connect(settings.database_url.removeprefix("sqlite:///"), timeout=1)
    conn.isolation_level = None
    conn.execute("BEGIN IMMEDIATE")
    release = threading.Timer(3 * PATIENCE, conn.rollback)
    release.start()
    yield
    release.cancel()
    conn.rollback()
    conn.close()


def _timed(call: object) -> float:
    started = time.monotonic()
    with pytest.raises((Invalid, NotEnoughGPUs)):
        call()  # type: ignore[operator]
    return time.monotonic() - started


def test_an_unknown_type_is_refused_without_waiting_for_the_lock(
    settings: Settings, db: Database, writer_busy: None
) -> None:
    assert _timed(lambda: allocations.request(db, settings, BOB, "h100", 1, 1)) < PATIENCE


def test_no_free_gpu_is_refused_without_waiting_for_the_lock(
    settings: Settings, db: Database
) -> None:
    if not settings.database_url.startswith("sqlite"):
        pytest.skip("the write lock is SQLite's")
    allocations.request(db, settings, ALICE, "a100", 2, 1)  # every a100 is taken
    conn = sqlite3.connect(settings.database_url.removeprefix("sqlite:///"), timeout=1)
    conn.isolation_level = None
    conn.execute("BEGIN IMMEDIATE")
    try:
        assert _timed(lambda: allocations.request(db, settings, BOB, "a100", 1, 1)) < PATIENCE
    finally:
        conn.rollback()
        conn.close()
