"""Allocation requests take turns on a lock (Database.serialized): losers wait instead of
sleeping in SQLite's busy handler or retrying on PostgreSQL, and the lock is never a way
to make root write somewhere else."""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
import time_machine
from sqlalchemy import select, text

from gpulocker import allocations, capacity, heartbeat, lockouts, scheduler
from gpulocker.config import Settings
from gpulocker.db import Database
from gpulocker.errors import GPULockerError, NotEnoughGPUs
from gpulocker.gpus import GpuInfo
from gpulocker.inventory import TypedGpu, register
from gpulocker.models import Allocation, utcnow
from gpulocker.scheduling_models import QueuedRequest


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


def test_a_turn_that_comes_after_the_gpus_went_is_refused_without_a_write(
    db: Database, settings: Settings
) -> None:
    """A waiter whose turn comes once the ones before it took every GPU is refused on a
    small read: it never asks for SQLite's write lock."""
    if not db.is_sqlite:
        pytest.skip("the turn is a file lock and the write lock SQLite's")
    database = db.url.split("///", 1)[1]
    turn = _hold_the_turn(db)  # the one before is writing
    thread, outcome = _in_background(
        lambda: allocations.request(db, settings, "waiter", "4090", 1, 1)
    )
    _blocked_on(turn)  # it sleeps until its turn
    with db.transaction() as session:  # the one before takes them all
        allocations._grant(session, settings, "before", "before", "4090", 4, 1, None)
    writer = sqlite3.connect(database, timeout=1)
    writer.isolation_level = None
    writer.execute("BEGIN IMMEDIATE")  # a write transaction now would wait for this
    try:
        started = time.monotonic()
        os.close(turn)
        thread.join(5)
        assert time.monotonic() - started < 5 and not thread.is_alive()
    finally:
        writer.rollback()
        writer.close()
    assert outcome == ["not enough free 4090 GPUs: asked for 1, 0 free"]


def test_a_waiter_for_an_unknown_type_is_told_it_is_unknown(
    db: Database, settings: Settings
) -> None:
    """The quick check in the turn leaves an unknown type to the full check's message."""
    if not db.is_sqlite:
        pytest.skip("the turn is a file lock on SQLite")
    outcome = _after_waiting(db, lambda: allocations.request(db, settings, "waiter", "h100", 1, 1))
    assert outcome == ["unknown GPU type 'h100' (known: 4090, a100)"]


def test_a_locked_out_waiter_is_told_so_even_when_the_gpus_went(
    db: Database, settings: Settings
) -> None:
    """The quick check in the turn says only that the GPUs went; a locked-out user asking
    to wait must still hear "locked out", not be put in the line."""
    if not db.is_sqlite:
        pytest.skip("the turn is a file lock on SQLite")
    allocations.request(db, settings, "alice", "4090", 4, 1)  # every 4090 is taken
    with db.transaction() as session:
        lockouts.lock_out(session, settings, "waiter", "used GPU 1 without an allocation")
    outcome = _after_waiting(
        db, lambda: scheduler.request_or_wait(db, settings, "waiter", "4090", 1, 1)
    )
    assert len(outcome) == 1 and outcome[0].startswith("waiter is locked out until")
    with db.session() as session:
        assert session.scalars(select(QueuedRequest)).all() == []


def _hold_the_turn(db: Database) -> int:
    """Take the allocation turn on SQLite as a request in progress holds it; closing the
    returned descriptor ends it."""
    database = db.url.split("///", 1)[1]
    turn = os.open(f"{database}.allocate.lock", os.O_RDONLY | os.O_CREAT, 0o600)
    fcntl.flock(turn, fcntl.LOCK_EX)
    return turn


def _after_waiting(db: Database, call: Callable[[], object]) -> list[str]:
    """Run a request that finds the turn taken and gets it once the holder lets go; its
    outcome as `_in_background` reports it."""
    turn = _hold_the_turn(db)
    thread, outcome = _in_background(call)
    _blocked_on(turn)
    os.close(turn)
    thread.join(10)
    return outcome


def _in_background(call: Callable[[], object]) -> tuple[threading.Thread, list[str]]:
    """Run a request in a thread; the list gets "granted" or the refusal's message."""
    outcome: list[str] = []

    def run() -> None:
        try:
            call()
            outcome.append("granted")
        except GPULockerError as exc:
            outcome.append(exc.message)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def _blocked_on(fd: int) -> None:
    """Wait until another thread is blocked on the flock of `fd` (/proc/locks lists it)."""
    inode = f":{os.fstat(fd).st_ino} "
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open("/proc/locks") as locks:
            if any("->" in line and "FLOCK" in line and inode in line for line in locks):
                return
        time.sleep(0.01)
    raise AssertionError("the waiter never waited for its turn")


@pytest.mark.parametrize("count", [1, 2, 3])
def test_a_refusal_at_once_says_what_a_full_check_says(
    db: Database, settings: Settings, count: int
) -> None:
    """Two free GPUs here, two on a host whose agent is silent, one on a third host."""
    allocations.request(db, settings, "alice", "4090", 2, 1)
    for host, n in (("silent", 2), ("small", 1)):
        infos = [GpuInfo(i, "RTX 4090", i, f"/dev/nvidia{i}", 24000) for i in range(n)]
        with db.transaction() as session:
            register(session, host, [TypedGpu(g, "4090") for g in infos])
    stale = utcnow() - timedelta(seconds=settings.agent_stale_seconds + 5)
    with time_machine.travel(stale, tick=False), db.transaction() as session:
        heartbeat.beat(session, heartbeat.agent_name("silent"))
    with db.session() as session:
        quick = capacity.shortage(session.connection(), settings, "4090", count)
        if count <= 2:  # some host has enough: the full check decides
            assert quick is None
            assert len(capacity.choose(session, settings, "4090", count, 1, utcnow())) == count
            return
        with pytest.raises(NotEnoughGPUs) as full:
            capacity.choose(session, settings, "4090", count, 1, utcnow())
    assert quick is not None
    assert quick.message == full.value.message and "silent" in quick.message
    assert quick.details == full.value.details == {"free": 3}


def test_on_postgresql_a_hopeless_request_is_refused_while_another_holds_the_turn(
    db: Database, settings: Settings
) -> None:
    """Every request is checked on a read before it waits for its turn: on PostgreSQL,
    where readers run in parallel, a refusal never queues behind a slow grant."""
    if db.is_sqlite:
        pytest.skip("the turn is an advisory lock here")
    allocations.request(db, settings, "alice", "4090", 4, 1)  # every 4090 is taken
    url = db.url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url) as holder:  # a grant in progress holds the turn
        holder.execute("SELECT pg_advisory_xact_lock(hashtext('gpulocker:allocate'))")
        thread, outcome = _in_background(
            lambda: allocations.request(db, settings, "late", "4090", 1, 1)
        )
        thread.join(10)
        alive = thread.is_alive()
        holder.rollback()
    thread.join(10)
    assert not alive, "the refusal waited for the turn"
    assert outcome == ["not enough free 4090 GPUs: asked for 1, 0 free"]
