"""Expiry, idle revocation and reminders (SPEC section 5), with a real agent ticking
through simulated hours (time moved by time_machine), real users and real processes."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import time_machine
from sqlalchemy import select

from gpulocker import allocations, lease, policies
from gpulocker.agent.loop import Agent
from gpulocker.config import Settings
from gpulocker.context import Context
from gpulocker.db import Database
from gpulocker.gpus.simulated import write_load
from gpulocker.models import ACTIVE, EXPIRED, REVOKED, Allocation, Event, Notification
from tests.helpers import ADMIN, ALICE, hold_open_as, wait_for

START = datetime(2031, 3, 2, 9, 0, tzinfo=UTC)
STEP = timedelta(minutes=5)


@pytest.fixture
def policy_settings(settings: Settings) -> Settings:
    """Idle after 1 h, history and policies every 5 min, a 1 h grace after expiry."""
    return settings.with_overrides(
        revoke_idle_gpu_after_hours=1.0,
        gpu_activity_check_minutes=5.0,
        check_for_idle_gpu_hours=5 / 60,
        expiry_grace_hours=1.0,
        expiry_reminder_minutes=30.0,
    )


@pytest.fixture
def clock() -> Iterator[Any]:
    with time_machine.travel(START, tick=True) as traveller:
        yield traveller


class Lab:
    """One agent on the test host, and the clock, moved 5 minutes per tick."""

    def __init__(self, settings: Settings, db: Database, clock: Any) -> None:
        self.settings, self.db, self.clock = settings, db, clock
        self.ctx = Context(settings)
        self.agent = Agent(self.ctx)
        self.agent.tick(force=True)

    def request(self, hours: float, gpu_id: int = 0) -> Allocation:
        (row,) = allocations.request(
            self.db, self.settings, ALICE, "4090", gpu_ids=[gpu_id], hours=hours
        )
        self.agent.tick(force=True)  # reconcile grants the ACL, history starts
        return row

    def advance(self, steps: int = 1, before_tick: Any = None) -> None:
        for _ in range(steps):
            self.clock.shift(STEP)
            if before_tick is not None:
                before_tick()
            self.agent.tick(force=True)

    def state(self, allocation_id: int) -> Allocation:
        with self.db.session() as s:
            row = s.get(Allocation, allocation_id)
        assert row is not None
        return row

    def inbox(self, user: str) -> list[tuple[str, str]]:
        with self.db.session() as s:
            rows = s.scalars(
                select(Notification).where(Notification.user == user).order_by(Notification.id)
            )
            return [(n.kind, n.message) for n in rows]

    def close(self) -> None:
        self.agent.close()
        self.ctx.close()


@pytest.fixture
def lab(policy_settings: Settings, db: Database, clock: Any) -> Iterator[Lab]:
    lab = Lab(policy_settings, db, clock)
    yield lab
    lab.close()


def forced(lab: Lab, **changes: Any) -> Lab:
    """The same lab with other settings (a fresh agent; the old one is closed)."""
    lab.close()
    return Lab(lab.settings.with_overrides(**changes), lab.db, lab.clock)


def ended_by_agent(lab: Lab, proc: subprocess.Popen[bytes]) -> int:
    """Tick (in real time) until the agent has ended `proc`; its exit status."""
    wait_for(lambda: lab.agent.tick(force=True) is not None and proc.poll() is not None, timeout=10)
    return proc.returncode


def kinds(lab: Lab, user: str) -> list[str]:
    return [kind for kind, _ in lab.inbox(user)]


# --- expiry


def test_it_releases_an_expired_allocation_with_no_processes(lab: Lab) -> None:
    row = lab.request(hours=1)
    lab.advance(11)  # 55 min
    assert lab.state(row.id).state == ACTIVE
    lab.advance(2)  # 65 min
    ended = lab.state(row.id)
    assert (ended.state, ended.release_reason, ended.released_by) == (EXPIRED, "expired", "policy")
    assert lab.inbox(ALICE)[-1] == (
        "expired",
        "Your GPU 0 (4090) on testhost was expired: expired.",
    )


def test_it_keeps_an_expired_allocation_in_use_for_the_grace_then_revokes_it(
    lab: Lab, users: dict
) -> None:
    row = lab.request(hours=1)
    proc = hold_open_as(users[ALICE], row.device)
    try:
        lab.advance(13)  # 65 min: expired, but alice still works there
        assert lab.state(row.id).state == ACTIVE
        assert proc.poll() is None
        kind, message = lab.inbox(ALICE)[-1]
        assert kind == "expiry_grace"
        assert message == (
            "Your GPU 0 (4090) on testhost expired at 2031-03-02 10:00 UTC, but your processes "
            f"still run there (pid {proc.pid}). Save your work or extend it: it will be revoked "
            "at 2031-03-02 11:00 UTC."
        )
        lab.advance(10)  # 115 min: still in the grace, warned only once
        assert lab.state(row.id).state == ACTIVE
        assert kinds(lab, ALICE).count("expiry_grace") == 1
        lab.advance(2)  # 125 min: grace over
        assert lab.state(row.id).state == EXPIRED
        assert ended_by_agent(lab, proc) == -signal.SIGTERM
        wait_for(lambda: lab.state(row.id).access_removed_at)
    finally:
        proc.kill()


def test_it_revokes_at_once_with_force_revoke(lab: Lab, users: dict) -> None:
    lab = forced(lab, force_revoke=True)
    try:
        row = lab.request(hours=1)
        proc = hold_open_as(users[ALICE], row.device)
        lab.advance(13)
        assert lab.state(row.id).state == EXPIRED
        assert "expiry_grace" not in kinds(lab, ALICE)
        assert ended_by_agent(lab, proc) == -signal.SIGTERM
    finally:
        lab.close()


def test_it_reminds_once_before_the_end(lab: Lab) -> None:
    write_load(lab.settings.device_path, 0, utilization=90, memory_mib=8000)  # busy: not idle
    row = lab.request(hours=2)
    lab.advance(17)  # 85 min: 35 min left
    assert "expiring_soon" not in kinds(lab, ALICE)
    lab.advance(1)  # 90 min: 30 min left
    assert lab.inbox(ALICE)[-1] == (
        "expiring_soon",
        "Your GPU 0 (4090) on testhost expires at 2031-03-02 11:00 UTC (in 30 min). "
        "Extend it if you still need it.",
    )
    lab.advance(3)
    assert kinds(lab, ALICE).count("expiring_soon") == 1
    allocations.extend(lab.db, lab.settings, ALICE, row.id, 1)  # a new end, a new reminder
    lab.advance(8)  # 145 min: the new end is 12:00, 35 min away
    assert kinds(lab, ALICE).count("expiring_soon") == 1
    lab.advance(1)  # 150 min: 30 min before the new end
    assert kinds(lab, ALICE).count("expiring_soon") == 2
    assert lab.state(row.id).state == ACTIVE


# --- idle


def test_it_revokes_an_allocation_idle_for_the_whole_window(lab: Lab) -> None:
    row = lab.request(hours=8)
    lab.advance(11)  # 55 min of samples, all idle, but the allocation is younger than 1 h
    assert lab.state(row.id).state == ACTIVE
    lab.advance(1)  # 60 min: idle for the whole window
    ended = lab.state(row.id)
    assert (ended.state, ended.release_reason) == (REVOKED, "idle")
    assert lab.inbox(ALICE)[-1] == ("revoked", "Your GPU 0 (4090) on testhost was revoked: idle.")


def test_it_keeps_an_allocation_busy_for_a_single_sample(lab: Lab, settings: Settings) -> None:
    row = lab.request(hours=8)
    dev = lab.settings.device_path
    lab.advance(6)  # 30 min
    write_load(dev, 0, utilization=50, memory_mib=0)
    lab.advance(1)  # 35 min: one busy sample
    write_load(dev, 0, utilization=0, memory_mib=0)
    lab.advance(8)  # 75 min: the busy sample is in the last hour
    assert lab.state(row.id).state == ACTIVE
    lab.advance(6)  # 105 min: a whole hour idle since the busy sample
    assert lab.state(row.id).state == REVOKED


def test_memory_in_use_alone_keeps_an_allocation(lab: Lab) -> None:
    row = lab.request(hours=8)
    write_load(lab.settings.device_path, 0, utilization=0, memory_mib=2048)  # 2 GB, 0 %
    lab.advance(15)
    assert lab.state(row.id).state == ACTIVE


def test_it_keeps_an_allocation_with_a_gap_in_the_samples(lab: Lab) -> None:
    row = lab.request(hours=8)
    dev = lab.settings.device_path
    lab.advance(6)
    write_load(dev, 0, error="GPU is lost")  # one reading fails: no sample
    lab.advance(2)
    write_load(dev, 0, utilization=0, memory_mib=0)
    lab.advance(7)  # 75 min: idle throughout, except for the 10 minutes nobody saw
    assert lab.state(row.id).state == ACTIVE


def test_it_warns_instead_of_revoking_while_the_holder_has_processes(lab: Lab, users: dict) -> None:
    row = lab.request(hours=8)
    proc = hold_open_as(users[ALICE], row.device)
    try:
        lab.advance(13)
        assert lab.state(row.id).state == ACTIVE
        assert proc.poll() is None
        expected = (
            "idle_warning",
            f"GPU 0 (4090) on testhost held by {ALICE} has been idle for 1 h, but their "
            f"processes still run there (pid {proc.pid}). Please release it if it is not needed.",
        )
        assert lab.inbox(ALICE)[-1] == expected
        assert lab.inbox(ADMIN)[-1] == expected
        lab.advance(6)
        assert kinds(lab, ALICE).count("idle_warning") == 1  # once per window
        with lab.db.session() as s:
            warned = s.scalars(select(Event).where(Event.kind == "idle_warning")).all()
        assert len(warned) == 1
    finally:
        proc.kill()


def test_it_revokes_an_idle_allocation_with_processes_under_force_revoke(
    lab: Lab, users: dict
) -> None:
    lab = forced(lab, force_revoke=True)
    try:
        row = lab.request(hours=8)
        proc = hold_open_as(users[ALICE], row.device)
        lab.advance(13)
        assert lab.state(row.id).state == REVOKED
        assert ended_by_agent(lab, proc) == -signal.SIGTERM
    finally:
        lab.close()


def test_a_lost_gpu_leaves_the_others_working(lab: Lab, users: dict) -> None:
    lost = lab.request(hours=8, gpu_id=1)
    idle = lab.request(hours=8, gpu_id=0)
    write_load(lab.settings.device_path, 1, error="GPU is lost")
    lab.advance(13)
    assert lab.state(lost.id).state == ACTIVE  # no samples: never idle
    assert lab.state(idle.id).state == REVOKED  # the healthy GPU's policy still ran
    assert kinds(lab, ADMIN).count("gpu_unhealthy") == 1
    (row,) = allocations.request(lab.db, lab.settings, ALICE, "4090", 1, 1)
    assert row.gpu_id == 0  # and allocating goes on as before


def test_expiry_keeps_time_with_a_long_idle_period(lab: Lab) -> None:
    lab = forced(lab, check_for_idle_gpu_hours=2.0)  # the original app's example value
    try:
        short = lab.request(hours=1, gpu_id=0)
        idle = lab.request(hours=8, gpu_id=1)
        lab.advance(13)  # 65 min
        assert lab.state(short.id).state == EXPIRED  # expiry is checked every minute
        assert lab.state(idle.id).state == ACTIVE  # idle for 1 h, but checked every 2 h
        lab.advance(12)  # 125 min: the idle check's period came round
        assert lab.state(idle.id).state == REVOKED
    finally:
        lab.close()


# --- one runner


def test_one_process_runs_the_policies_per_period(lab: Lab, clock: Any) -> None:
    row = lab.request(hours=1)
    other = Agent(Context(lab.settings))
    try:
        assert policies.policies_step(other) is False  # lab's agent took this period
        clock.shift(timedelta(hours=1, minutes=5))  # expired: there is work to do
        assert policies.policies_step(other) is True
        assert policies.policies_step(lab.agent) is False  # the period is other's
        assert lab.state(row.id).expiry_warned_at is not None  # no fresh sample: grace
        with lab.db.session() as s:
            graces = s.scalars(select(Event).where(Event.kind == "expiry_grace")).all()
        assert len(graces) == 1
    finally:
        other.close()
        other.ctx.close()


CLAIM = """
import sys
from gpulocker import lease
from gpulocker.db import Database
print(lease.claim_slot(Database(sys.argv[1]), "race", 3600))
"""


def test_only_one_of_many_processes_gets_the_slot(db: Database, settings: Settings) -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CLAIM, settings.database_url], stdout=subprocess.PIPE
        )
        for _ in range(6)
    ]
    answers = [p.communicate(timeout=60)[0].decode().strip() for p in procs]
    assert sorted(answers) == ["False"] * 5 + ["True"]


def test_a_crashed_lease_holder_is_replaced(db: Database, clock: Any) -> None:
    assert lease.acquire(db, "policies-leader", 30, holder="a")
    assert not lease.acquire(db, "policies-leader", 30, holder="b")
    assert lease.acquire(db, "policies-leader", 30, holder="a")  # renewal
    assert lease.holder_of(db, "policies-leader") == "a"
    clock.shift(timedelta(seconds=31))  # "a" died and stopped renewing
    assert lease.acquire(db, "policies-leader", 30, holder="b")
    assert lease.holder_of(db, "policies-leader") == "b"
    assert lease.release(db, "policies-leader", holder="b")
    assert lease.acquire(db, "policies-leader", 30, holder="a")


def test_idle_needs_samples_covering_the_window(policy_settings: Settings) -> None:
    end = START + timedelta(hours=1)
    every_5 = [(START + timedelta(minutes=m), 0.0, 0.0) for m in range(0, 61, 5)]
    assert policies.idle_throughout(policy_settings, every_5, START, end)
    assert not policies.idle_throughout(policy_settings, [], START, end)
    assert not policies.idle_throughout(policy_settings, every_5[2:], START, end)  # late start
    assert not policies.idle_throughout(policy_settings, every_5[:-3], START, end)  # stopped
    missing_one = every_5[:6] + every_5[7:]
    assert not policies.idle_throughout(policy_settings, missing_one, START, end)
    at_threshold = [*every_5[:-1], (end, 1.0, 0.0)]  # 1 % is not below MIN 1 %
    assert not policies.idle_throughout(policy_settings, at_threshold, START, end)
