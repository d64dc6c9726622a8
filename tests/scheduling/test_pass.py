"""The scheduling pass reads once and writes only what changes (SPEC section 11), on
SQLite and PostgreSQL: a fixed number of statements however long the line, no write
transaction when nothing can be granted, one per grant, decisions kept right in memory
between grants, and a picture gone stale costs a refused grant and a fresh read."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest
import time_machine
from sqlalchemy import event, select

from gpulocker import allocations, heartbeat, lockouts, maintenance, queue, scheduler
from gpulocker.config import Settings
from gpulocker.db import Database
from gpulocker.models import ACTIVE, GRANTED, WAITING, Allocation, utcnow
from gpulocker.scheduling_models import QueuedRequest
from gpulocker.scheduling_view import load
from tests.helpers import ADMIN, ALICE, BOB, CAROL


@pytest.fixture
def writes(db: Database, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the write transactions opened on `db` (one entry per transaction)."""
    opened: list[int] = []
    real = db.transaction

    @contextmanager
    def counted() -> Iterator[Any]:
        opened.append(1)
        with real() as session:
            yield session

    monkeypatch.setattr(db, "transaction", counted)
    return opened


def _statements(db: Database, settings: Settings) -> int:
    seen: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(statement)

    event.listen(db.engine, "before_cursor_execute", count)
    try:
        scheduler.run_pass(db, settings)
    finally:
        event.remove(db.engine, "before_cursor_execute", count)
    return len(seen)


def _waiting(db: Database, settings: Settings, user: str, count: int, hours: float = 1) -> int:
    return queue.submit(db, settings, user, "4090", count, hours).id


def _holds(db: Database, user: str) -> int:
    with db.session() as s:
        stmt = select(Allocation).where(Allocation.user == user, Allocation.state == ACTIVE)
        return len(s.scalars(stmt).all())


def test_a_pass_reads_a_fixed_number_of_times_and_writes_nothing_when_nothing_fits(
    db: Database, settings: Settings, writes: list[int]
) -> None:
    allocations.request(db, settings, CAROL, "4090", 4, 2)
    for i in range(3):
        _waiting(db, settings, (ALICE, BOB)[i % 2], 1 + i % 2)
    scheduler.run_pass(db, settings)  # warm: the fair-share sums of ended allocations
    short = _statements(db, settings)
    for i in range(40):
        _waiting(db, settings, (ALICE, BOB)[i % 2], 1 + i % 3)
    writes.clear()
    assert _statements(db, settings) == short  # 43 waiting cost what 3 did
    assert writes == []  # nothing granted, nothing due: no write transaction at all


def test_grants_in_one_pass_count_the_ones_before_them(
    db: Database, settings: Settings, writes: list[int]
) -> None:
    first = _waiting(db, settings, ALICE, 2)
    second = _waiting(db, settings, BOB, 2)
    third = _waiting(db, settings, CAROL, 2)
    writes.clear()
    assert scheduler.run_pass(db, settings).granted == 2
    assert len(writes) == 2  # the third was never tried: the pass knew the GPUs were gone
    with db.session() as s:
        states = {r.id: r.state for r in s.scalars(select(QueuedRequest))}
    assert states == {first: GRANTED, second: GRANTED, third: WAITING}


def test_a_stale_picture_costs_one_refused_grant_then_a_fresh_read(
    db: Database, settings: Settings
) -> None:
    _waiting(db, settings, ALICE, 2, hours=1)
    _waiting(db, settings, BOB, 1, hours=3)
    with db.session() as s:
        view = load(s, settings, utcnow())
    allocations.request(db, settings, CAROL, "4090", 3, 2)  # after the pass read
    assert scheduler.serve_queue(db, settings, utcnow(), view) == 0
    # ALICE's grant was refused (one GPU left); read again, she waits for CAROL's end in
    # 2 h, and BOB's 3 h would end after that: he is not granted ahead of her.
    assert _holds(db, ALICE) == 0 and _holds(db, BOB) == 0


def test_maintenance_and_lockouts_refuse_in_memory(
    db: Database, settings: Settings, writes: list[int]
) -> None:
    _waiting(db, settings, ALICE, 1)
    locked = _waiting(db, settings, BOB, 1)
    maintenance.set_enabled(db, settings, ADMIN, True)
    admins = queue.submit(db, settings, ADMIN, "4090", 1, 1, user=CAROL).id
    with db.transaction() as s:
        lockouts.lock_out(s, settings, BOB, "test")
    writes.clear()
    assert scheduler.run_pass(db, settings).granted == 1  # only the admin's request
    assert len(writes) == 1
    maintenance.set_enabled(db, settings, ADMIN, False)
    assert scheduler.run_pass(db, settings).granted == 1  # ALICE; BOB stays locked out
    with db.session() as s:
        states = {r.id: r.state for r in s.scalars(select(QueuedRequest))}
    assert states[admins] == GRANTED and states[locked] == WAITING
    assert _holds(db, ALICE) == 1 and _holds(db, BOB) == 0


def test_a_silent_hosts_gpus_are_not_tried(
    db: Database, settings: Settings, writes: list[int]
) -> None:
    _waiting(db, settings, ALICE, 1)
    stale = utcnow() - timedelta(seconds=settings.agent_stale_seconds + 5)
    with time_machine.travel(stale, tick=False), db.transaction() as s:
        heartbeat.beat(s, heartbeat.agent_name(settings.gpu_host))
    writes.clear()
    assert scheduler.run_pass(db, settings).granted == 0
    assert writes == []
    with db.transaction() as s:
        heartbeat.beat(s, heartbeat.agent_name(settings.gpu_host))
    assert scheduler.run_pass(db, settings).granted == 1
