"""Allocation requests take turns on a lock (Database.serialized): losers wait instead of
sleeping in SQLite's busy handler or retrying on PostgreSQL, and the lock is never a way
to make root write somewhere else."""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

import pytest
from sqlalchemy import select, text

from gpulocker import allocations
from gpulocker.config import Settings
from gpulocker.db import Database
from gpulocker.errors import NotEnoughGPUs
from gpulocker.models import Allocation


def _race(db: Database, settings: Settings, racers: int) -> list[str]:
    barrier = threading.Barrier(racers)
    outcomes: list[str] = []

    def take(i: int) -> None:
        barrier.wait()
        try:
            allocations.request(db, settings, f"racer{i}", "4090", 1, 1)
            outcomes.append("granted")
        except NotEnoughGPUs:
            outcomes.append("refused")

    threads = [threading.Thread(target=take, args=(i,)) for i in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return outcomes


def test_waiting_requests_see_what_the_one_before_took(
    db: Database, settings: Settings, caplog: object
) -> None:
    outcomes = _race(db, settings, 16)
    assert sorted(outcomes) == ["granted"] * 4 + ["refused"] * 12
    with db.session() as session:
        taken = session.scalars(select(Allocation.gpu_id).where(Allocation.state == "active"))
        assert sorted(taken) == [0, 1, 2, 3]
    # Nobody lost a race on the unique index: each waited its turn and saw what was free.
    assert "lost a race" not in caplog.text  # type: ignore[attr-defined]


def test_a_planted_link_at_the_lock_path_is_not_followed(
    db: Database, settings: Settings, tmp_path: Path
) -> None:
    if not db.is_sqlite:
        pytest.skip("the lock is a file only on SQLite (see the next test for PostgreSQL)")
    database = db.url.split("///", 1)[1]
    target = tmp_path / "precious"
    target.write_text("keep")
    target.chmod(0o600)
    os.symlink(target, f"{database}.allocate.lock")
    (row,) = allocations.request(db, settings, "alice", "4090", 1, 1)
    assert row.gpu_id == 0
    assert target.read_text() == "keep" and oct(target.stat().st_mode & 0o777) == "0o600"


def test_the_lock_ends_with_the_request(db: Database, settings: Settings) -> None:
    """Nothing stays held after a request: on SQLite the lock file is closed, on PostgreSQL
    the advisory lock is transaction-scoped."""
    allocations.request(db, settings, "alice", "4090", 1, 1)
    if db.is_sqlite:
        database = db.url.split("///", 1)[1]
        with open(f"{database}.allocate.lock", "rb") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free: raises if held
        return
    with db.session() as session:
        advisory = session.execute(
            text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")
        ).scalar()
    assert advisory == 0
