"""Waiting requests (SPEC section 11) on SQLite and PostgreSQL: never granted twice, in
fair-share order, with aging and backfill that never delays the head."""

from __future__ import annotations

import contextlib
import random
import threading
from datetime import timedelta

import pytest
import time_machine
from sqlalchemy import func, select

from gpulocker import allocations, lockouts, maintenance, queue, scheduler
from gpulocker.config import Settings
from gpulocker.db import Database
from gpulocker.errors import Conflict, Invalid, LockedOut, Maintenance
from gpulocker.models import (
    ACTIVE,
    EXPIRED,
    GRANTED,
    RELEASED,
    WAITING,
    Allocation,
    Event,
    Notification,
    utcnow,
)
from gpulocker.scheduling_models import QueuedRequest
from tests.helpers import ADMIN, ALICE, BOB, CAROL


def _fill(db: Database, settings: Settings, hours: float = 1.0) -> list[Allocation]:
    """Every 4090 taken by CAROL."""
    return allocations.request(db, settings, CAROL, "4090", 4, hours)


def _held_by(db: Database, user: str) -> list[Allocation]:
    with db.session() as s:
        stmt = select(Allocation).where(Allocation.user == user, Allocation.state == ACTIVE)
        return list(s.scalars(stmt))


def test_a_wait_request_is_granted_at_once_when_it_can_be(db: Database, settings: Settings) -> None:
    rows, waiting = scheduler.request_or_wait(db, settings, ALICE, "4090", 2, 1)
    assert waiting is None and len(rows) == 2


def test_it_waits_then_is_granted_and_notified(db: Database, settings: Settings) -> None:
    held = _fill(db, settings)
    rows, waiting = scheduler.request_or_wait(db, settings, ALICE, "4090", 2, 1)
    assert rows == [] and waiting is not None and waiting.state == WAITING
    assert scheduler.run_pass(db, settings).granted == 0
    for row in held[:2]:
        allocations.release(db, settings, CAROL, row.id)
    assert scheduler.run_pass(db, settings).granted == 1
    got = queue.get(db, settings, ALICE, waiting.id)
    assert got.state == GRANTED and len(got.allocation_ids or []) == 2
    assert len(_held_by(db, ALICE)) == 2
    with db.session() as s:
        inbox = [
            n.message for n in s.scalars(select(Notification).where(Notification.user == ALICE))
        ]
        kinds = set(s.scalars(select(Event.kind)))
    assert any("waits for GPUs" in m for m in inbox)
    cuda = allocations.cuda_visible_devices(db, _held_by(db, ALICE))
    assert any(f"CUDA_VISIBLE_DEVICES={cuda}" in m for m in inbox)
    assert {"queued", "request_granted"} <= kinds


def test_bad_wait_hours_and_cancel_and_expiry(db: Database, settings: Settings) -> None:
    _fill(db, settings)
    with pytest.raises(Invalid, match="QUEUE_MAX_WAIT_HOURS"):
        queue.submit(db, settings, ALICE, "4090", 1, 1, wait_hours=25)
    with pytest.raises(Invalid, match="unknown GPU type"):
        queue.submit(db, settings, ALICE, "h100", 1, 1)
    first = queue.submit(db, settings, ALICE, "4090", 1, 1, wait_hours=2)
    second = queue.submit(db, settings, BOB, "4090", 1, 1, wait_hours=2)
    with pytest.raises(Exception, match="no request"):
        queue.cancel(db, settings, BOB, first.id)
    assert queue.cancel(db, settings, ALICE, first.id).state == "cancelled"
    with pytest.raises(Conflict):
        queue.cancel(db, settings, ALICE, first.id)
    with time_machine.travel(utcnow() + timedelta(hours=2, minutes=1)):
        assert scheduler.run_pass(db, settings).expired == 1
    assert queue.get(db, settings, ADMIN, second.id).state == EXPIRED


def test_a_locked_out_user_and_maintenance_mode_keep_new_requests_out_of_the_line(
    db: Database, settings: Settings
) -> None:
    _fill(db, settings)
    with db.transaction() as session:
        lockouts.lock_out(session, settings, BOB, "used GPU 1 without an allocation")
    with pytest.raises(LockedOut, match="is locked out until"):
        queue.submit(db, settings, BOB, "4090", 1, 1)
    maintenance.set_enabled(db, settings, ADMIN, True)
    with pytest.raises(Maintenance):
        queue.submit(db, settings, ALICE, "4090", 1, 1)
    assert queue.submit(db, settings, ADMIN, "4090", 1, 1).state == WAITING  # admins pass
    with db.session() as session:
        assert session.scalar(select(func.count()).select_from(QueuedRequest)) == 1


def test_twenty_waiting_requests_and_a_storm_of_releases(db: Database, settings: Settings) -> None:
    """Threads release GPUs and run passes at once: no request granted twice, no GPU twice."""
    rng = random.Random(7)
    holders = [f"gls{i}" for i in range(8)]
    for _i, user in enumerate(holders[:4]):
        allocations.request(db, settings, user, "4090", 1, 1)
    requests = [
        queue.submit(db, settings, f"glq{i}", "4090", rng.choice((1, 1, 2)), 0.5) for i in range(20)
    ]
    errors: list[BaseException] = []

    def storm(seed: int) -> None:
        local = random.Random(seed)
        try:
            for _ in range(30):
                with db.session() as s:
                    active = s.scalars(select(Allocation).where(Allocation.state == ACTIVE)).all()
                if active:
                    victim = local.choice(active)
                    with contextlib.suppress(Conflict):  # another thread released it first
                        allocations.release(db, settings, victim.user, victim.id)
                scheduler.run_pass(db, settings)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=storm, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    with db.session() as s:
        rows = s.scalars(select(QueuedRequest)).all()
        granted = [r for r in rows if r.state == GRANTED]
        ids = [a for r in granted for a in (r.allocation_ids or [])]
        queue_allocs = s.scalars(select(Allocation).where(Allocation.user.like("glq%"))).all()
        grant_events = (
            s.execute(select(Event.data).where(Event.kind == "request_granted")).scalars().all()
        )
        active = s.execute(
            select(Allocation.host, Allocation.gpu_id, func.count())
            .where(Allocation.state == ACTIVE)
            .group_by(Allocation.host, Allocation.gpu_id)
        ).all()
    assert len(granted) >= 10, "the storm should have served most of the line"
    assert len(ids) == len(set(ids)) == sum(r.count for r in granted)
    assert sorted(ids) == sorted(a.id for a in queue_allocs)  # nothing granted beside them
    per_request = [d["request_id"] for d in grant_events]
    assert len(per_request) == len(set(per_request)) == len(granted)
    assert all(n == 1 for _h, _g, n in active)
    assert all(r.state in (WAITING, GRANTED) for r in rows) and len(rows) == len(requests)


def _past_usage(db: Database, user: str, hours_ago: float, hours: float) -> None:
    now = utcnow()
    with db.transaction() as s:
        start = now - timedelta(hours=hours_ago)
        s.add(
            Allocation(
                user=user,
                host="old",
                gpu_id=0,
                gpu_type="4090",
                device="/dev/null",
                created_at=start,
                expires_at=start + timedelta(hours=hours),
                released_at=start + timedelta(hours=hours),
                state=RELEASED,
            )
        )


def test_fair_share_order(db: Database, settings: Settings) -> None:
    """The user with the smaller decayed usage goes first, though she asked later."""
    held = _fill(db, settings)
    _past_usage(db, ALICE, 30, 20)
    _past_usage(db, BOB, 300, 20)  # as much, but long ago: decayed
    first = queue.submit(db, settings, ALICE, "4090", 1, 1)
    second = queue.submit(db, settings, BOB, "4090", 1, 1)
    with db.session() as s:
        assert queue.positions(s, settings, utcnow()) == {second.id: 1, first.id: 2}
    allocations.release(db, settings, CAROL, held[0].id)
    scheduler.run_pass(db, settings)
    assert queue.get(db, settings, BOB, second.id).state == GRANTED
    assert queue.get(db, settings, ALICE, first.id).state == WAITING


def test_aging_puts_a_long_wait_first(db: Database, settings: Settings) -> None:
    held = _fill(db, settings, hours=20)
    _past_usage(db, ALICE, 10, 50)
    start = utcnow()
    with time_machine.travel(start):
        old = queue.submit(db, settings, ALICE, "4090", 1, 1)
    with time_machine.travel(start + timedelta(hours=12, minutes=30)):
        young = queue.submit(db, settings, BOB, "4090", 1, 1)
        allocations.release(db, settings, CAROL, held[0].id)
        scheduler.run_pass(db, settings)
    assert queue.get(db, settings, ALICE, old.id).state == GRANTED
    assert queue.get(db, settings, BOB, young.id).state == WAITING


def test_aged_requests_go_first_each_by_fair_share(db: Database, settings: Settings) -> None:
    """Aged requests go before every younger request that has not aged, but among
    themselves by fair share: a heavy user's older request does not go before a light
    user's that has aged too (oldest first would make a long line first come first
    served)."""
    _fill(db, settings, hours=30)
    _past_usage(db, ALICE, 10, 50)
    start = utcnow()
    with time_machine.travel(start):
        heavy = queue.submit(db, settings, ALICE, "4090", 1, 1)
    with time_machine.travel(start + timedelta(hours=1)):
        light = queue.submit(db, settings, BOB, "4090", 1, 1)
    with time_machine.travel(start + timedelta(hours=13, minutes=30)):
        fresh = queue.submit(db, settings, f"{BOB}x", "4090", 1, 1)
        with db.session() as s:
            places = queue.positions(s, settings, utcnow())
    assert places == {light.id: 1, heavy.id: 2, fresh.id: 3}


def test_backfill_only_when_it_ends_before_the_heads_sure_start(
    db: Database, settings: Settings
) -> None:
    """GPUs 0-1 free in 1 h, GPU 2 in 10 h, GPU 3 free: a 2-GPU head must wait 1 h; a
    half-hour request goes ahead of it, a two-hour one does not."""
    allocations.request(db, settings, CAROL, "4090", 2, 1)
    allocations.request(db, settings, CAROL, "4090", 1, 10)
    head = queue.submit(db, settings, ALICE, "4090", 2, 4)
    long = queue.submit(db, settings, BOB, "4090", 1, 2)
    short = queue.submit(db, settings, f"{BOB}x", "4090", 1, 0.5)
    scheduler.run_pass(db, settings)
    assert queue.get(db, settings, ADMIN, short.id).state == GRANTED
    assert queue.get(db, settings, ADMIN, long.id).state == WAITING
    assert queue.get(db, settings, ADMIN, head.id).state == WAITING
    with time_machine.travel(utcnow() + timedelta(hours=1, minutes=1)):
        for row in _held_by(db, CAROL):
            if row.expires_at <= utcnow():
                with db.transaction() as s:
                    alloc = s.get(Allocation, row.id)
                    assert alloc is not None
                    allocations.finish(s, settings, alloc, EXPIRED, "expired", "agent")
        scheduler.run_pass(db, settings)
    assert queue.get(db, settings, ADMIN, head.id).state == GRANTED
