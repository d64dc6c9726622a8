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
