"""The scheduler as an agent step: woken by a release, one scheduler across agents."""

from __future__ import annotations

from datetime import timedelta

import time_machine

from gpulocker import allocations, lease, queue, reservations, scheduler_step
from gpulocker.agent.loop import Agent
from gpulocker.config import Settings
from gpulocker.context import Context
from gpulocker.db import Database
from gpulocker.models import GRANTED, STARTED, WAITING, utcnow
from tests.helpers import ALICE, BOB, CAROL


def test_a_release_wakes_the_scheduler_step(settings: Settings, db: Database) -> None:
    ctx = Context(settings)
    agent = Agent(ctx)
    held = allocations.request(db, settings, CAROL, "a100", 2, 5)
    waiting = queue.submit(db, settings, ALICE, "a100", 1, 1)
    assert agent.tick(force=True).get("scheduler") is False
    assert scheduler_step.scheduler_step(agent) is False  # nothing changed: not even a read pass
    allocations.release(db, settings, CAROL, held[0].id)
    assert scheduler_step.scheduler_step(agent) is True  # the release's event woke it
    assert queue.get(db, settings, ALICE, waiting.id).state == GRANTED
    assert lease.holder_of(db, scheduler_step.LEASE) == lease.PROCESS_ID
    agent.close()


def test_a_booking_start_wakes_it_without_an_event(settings: Settings, db: Database) -> None:
    ctx = Context(settings)
    agent = Agent(ctx)
    start = utcnow() + timedelta(hours=3)
    booking = reservations.book(db, settings, BOB, "a100", 1, start, 1)
    scheduler_step.scheduler_step(agent)
    with time_machine.travel(start + timedelta(seconds=1)):
        assert scheduler_step.scheduler_step(agent) is True
    assert reservations.get(db, settings, BOB, booking.id).state == STARTED
    agent.close()


def test_only_the_lease_holder_schedules(settings: Settings, db: Database) -> None:
    ctx = Context(settings)
    agent = Agent(ctx)
    assert lease.acquire(
        db, scheduler_step.LEASE, scheduler_step.LEASE_SECONDS, holder="otherhost:1:x"
    )
    allocations.request(db, settings, CAROL, "a100", 2, 5)
    waiting = queue.submit(db, settings, ALICE, "a100", 1, 1)
    allocations.release_all(db, settings, CAROL)
    assert scheduler_step.scheduler_step(agent) is False
    assert queue.get(db, settings, ALICE, waiting.id).state == WAITING
    agent.close()
