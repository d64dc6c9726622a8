"""Leases survive a wall clock stepped back (SPEC §12): expiry is not stalled for the step."""

from __future__ import annotations

from datetime import timedelta

import time_machine

from gpulocker import lease
from gpulocker.db import Database
from gpulocker.models import utcnow


def test_a_clock_stepped_back_does_not_stall_a_lease(db: Database) -> None:
    start = utcnow()
    with time_machine.travel(start, tick=False) as clock:
        assert lease.acquire(db, "t", 60, holder="a")
        clock.move_to(start - timedelta(hours=1))  # NTP steps the clock back an hour
        # "a" crashed; "b" takes over after at most one lease length, not an hour more.
        clock.shift(61)
        assert lease.acquire(db, "t", 60, holder="b")
        assert not lease.acquire(db, "t", 60, holder="a")


def test_a_periodic_slot_runs_after_a_backward_step(db: Database) -> None:
    start = utcnow()
    with time_machine.travel(start, tick=False) as clock:
        assert lease.claim_slot(db, "job", 60, holder="a")
        clock.move_to(start - timedelta(hours=1))
        clock.shift(61)
        assert lease.claim_slot(db, "job", 60, holder="a")
        assert not lease.claim_slot(db, "job", 60, holder="b")


def test_a_caller_whose_clock_reads_a_little_earlier_does_not_take_the_slot(db: Database) -> None:
    # Six processes racing for a slot read their clocks before waiting for the write lock;
    # the one that read it a moment before the winner committed must still lose. Another
    # host whose clock is a few seconds behind must lose too.
    start = utcnow()
    with time_machine.travel(start, tick=False) as clock:
        assert lease.claim_slot(db, "job", 3600, holder="a")
        clock.move_to(start - timedelta(milliseconds=5))
        assert not lease.claim_slot(db, "job", 3600, holder="b")
        clock.move_to(start - timedelta(seconds=5))
        assert not lease.claim_slot(db, "job", 3600, holder="c")
        assert not lease.acquire(db, "job", 3600, holder="c")
