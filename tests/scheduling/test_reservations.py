"""Booking ahead (SPEC section 11) on SQLite and PostgreSQL: never overbooked, respected
by requests and extensions, turned into allocations at its start."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
import time_machine
from sqlalchemy import select

from gpulocker import allocations, reservations, scheduler
from gpulocker.config import Settings
from gpulocker.db import Database
from gpulocker.errors import Conflict, Forbidden, Invalid, NotEnoughGPUs
from gpulocker.models import ACTIVE, BOOKED, STARTED, Allocation, Notification, utcnow
from tests.helpers import ADMIN, ALICE, BOB, CAROL


def _hour(n: float) -> object:
    return utcnow().replace(minute=0, second=0, microsecond=0) + timedelta(hours=n)


def test_ten_concurrent_bookings_for_the_last_slot_get_exactly_one(
    db: Database, settings: Settings
) -> None:
    start = _hour(5)
    reservations.book(db, settings, CAROL, "a100", 1, start, 2)  # one of the two a100s
    barrier = threading.Barrier(10)
    won: list[int] = []
    refused: list[str] = []

    def try_book(i: int) -> None:
        barrier.wait()
        try:
            won.append(reservations.book(db, settings, f"glb{i}", "a100", 1, start, 2).id)
        except Conflict as exc:
            refused.append(exc.message)

    threads = [threading.Thread(target=try_book, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(won) == 1 and len(refused) == 9
    assert "earliest start that fits" in refused[0]


def test_a_booking_that_does_not_fit_names_the_earliest_start(
    db: Database, settings: Settings
) -> None:
    reservations.book(db, settings, ALICE, "4090", 4, _hour(2), 3)
    with pytest.raises(Conflict) as info:
        reservations.book(db, settings, BOB, "4090", 1, _hour(3), 1)
    assert info.value.details["earliest"] == _hour(5).isoformat()
    assert reservations.book(db, settings, BOB, "4090", 1, _hour(5), 1).state == BOOKED
    with pytest.raises(Invalid, match="RESERVATION_MAX_DAYS_AHEAD"):
        reservations.book(db, settings, BOB, "4090", 1, _hour(24 * 31), 1)
    with pytest.raises(Invalid, match="past"):
        reservations.book(db, settings, BOB, "4090", 1, _hour(-2), 1)
    with pytest.raises(Forbidden):
        reservations.book(db, settings, BOB, "4090", 1, _hour(9), 1, user=ALICE)
    assert reservations.book(db, settings, ADMIN, "4090", 1, _hour(9), 1, user=ALICE).user == ALICE


def test_requests_and_extend_respect_bookings(db: Database, settings: Settings) -> None:
    held = allocations.request(db, settings, ALICE, "4090", 1, 1)
    reservations.book(db, settings, BOB, "4090", 4, _hour(3), 1)
    with pytest.raises(NotEnoughGPUs, match="only until") as info:
        allocations.request(db, settings, CAROL, "4090", 1, 5)
    assert info.value.details["until"] == _hour(3).isoformat()
    assert allocations.request(db, settings, CAROL, "4090", 1, 1)  # ends before the booking
    with pytest.raises(Conflict, match="booked from") as refused:
        allocations.extend(db, settings, ALICE, held[0].id, 4)
    assert refused.value.details["until"] == _hour(3).isoformat()
    assert allocations.extend(db, settings, ALICE, held[0].id, 0.5).state == ACTIVE


def test_cancel_frees_the_window(db: Database, settings: Settings) -> None:
    booked = reservations.book(db, settings, BOB, "a100", 2, _hour(2), 2)
    with pytest.raises(Conflict):
        reservations.book(db, settings, ALICE, "a100", 1, _hour(2), 1)
    with pytest.raises(Exception, match="no reservation"):
        reservations.cancel(db, settings, ALICE, booked.id)
    assert reservations.cancel(db, settings, ADMIN, booked.id).state == "cancelled"
    assert reservations.book(db, settings, ALICE, "a100", 1, _hour(2), 1).state == BOOKED
    assert [r.id for r in reservations.list_for(db, settings, ADMIN, all_users=True)]


def test_start_converts_it_and_ends_an_overstaying_allocation(
    db: Database, settings: Settings
) -> None:
    """ALICE holds both a100s until the booking's start and stays in her grace time: at the
    start BOB's booking becomes an allocation and one of hers ends with reason reserved,
    after a reminder EXPIRY_REMINDER_MINUTES before."""
    graced = settings.with_overrides(expiry_grace_hours=2.0)
    start = _hour(2)
    now = utcnow()
    with time_machine.travel(now, tick=False):
        mine = allocations.request(
            db, graced, ALICE, "a100", 2, (start - now).total_seconds() / 3600
        )
    booking = reservations.book(db, graced, BOB, "a100", 1, start, 3)
    with time_machine.travel(start - timedelta(minutes=20)):
        assert scheduler.run_pass(db, graced).reminded == 2
    with time_machine.travel(start + timedelta(seconds=5)):
        result = scheduler.run_pass(db, graced)
    assert result.started == 1
    got = reservations.get(db, graced, BOB, booking.id)
    assert got.state == STARTED and len(got.allocation_ids or []) == 1
    with db.session() as s:
        bob = s.scalars(select(Allocation).where(Allocation.user == BOB)).one()
        ended = [s.get(Allocation, a.id) for a in mine]
        inbox = [
            n.message for n in s.scalars(select(Notification).where(Notification.user == ALICE))
        ]
    assert bob.state == ACTIVE and bob.expires_at == start + timedelta(hours=3)
    reasons = sorted((a.release_reason or "") for a in ended if a is not None)
    assert reasons == ["", "reserved"]
    assert any("is booked from" in m for m in inbox)


def test_a_booking_whose_gpus_are_gone_fails(db: Database, settings: Settings) -> None:
    from gpulocker import inventory

    booking = reservations.book(db, settings, BOB, "a100", 2, _hour(1), 1)
    with db.transaction() as s:
        inventory.set_health(s, settings.gpu_host, 4, False, "fallen off the bus")
    with time_machine.travel(_hour(1) + timedelta(seconds=1)):
        assert scheduler.run_pass(db, settings).failed == 1
    got = reservations.get(db, settings, BOB, booking.id)
    assert got.state == "failed" and "healthy" in (got.reason or "")
