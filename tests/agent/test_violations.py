"""Violations: real processes of real users on GPUs they do not hold, on SQLite and PostgreSQL."""

from __future__ import annotations

import pwd
import signal
import subprocess
from collections.abc import Iterator

import pytest
from sqlalchemy import select

from gpulocker import allocations, lockouts
from gpulocker.agent import violations
from gpulocker.agent.loop import Agent
from gpulocker.config import Settings
from gpulocker.context import Context
from gpulocker.db import Database
from gpulocker.errors import LockedOut
from gpulocker.gpus import GpuProcess, GpuSample
from gpulocker.gpus.simulated import device_file
from gpulocker.models import Event, Notification, utcnow
from tests.agent.test_agent import take_database_away
from tests.helpers import ADMIN, ALICE, BOB, CAROL, hold_open_as


def gpu(settings: Settings, gpu_id: int) -> str:
    return str(device_file(settings.device_path, gpu_id))


def violation_events(db: Database) -> list[Event]:
    with db.session() as s:
        return list(s.scalars(select(Event).where(Event.kind == "violation").order_by(Event.id)))


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes started by a test, killed afterwards if still running."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)


def test_it_kills_and_locks_out_a_violator_and_spares_holders_and_exempt_users(
    settings: Settings, db: Database, users: dict, procs: list
) -> None:
    settings = settings.with_overrides(exempt_users=("root", BOB))
    allocations.request(db, settings, ALICE, "4090", gpu_ids=[0], hours=1)
    # The files are still as the driver made them (0666): everyone can open them now.
    holder = hold_open_as(users[ALICE], gpu(settings, 0))
    violator = hold_open_as(users[CAROL], gpu(settings, 1))
    exempt = hold_open_as(users[BOB], gpu(settings, 2))
    procs += [holder, violator, exempt]

    ctx = Context(settings)
    agent = Agent(ctx)
    agent.tick()
    assert violator.wait(timeout=5) == -signal.SIGKILL
    agent.tick(force=True)
    assert holder.poll() is None and exempt.poll() is None

    (event,) = violation_events(db)
    assert event.user == CAROL and event.gpu_id == 1
    assert event.data is not None
    assert event.data["pids"] == [violator.pid] and event.data["killed"] is True
    assert event.data["names"] and event.data["names"][0].startswith("python")
    with db.session() as s:
        lockout = lockouts.active(s, CAROL)
        inbox = {
            n.user for n in s.scalars(select(Notification).where(Notification.kind == "violation"))
        }
    assert lockout is not None and lockout.until > utcnow()
    assert inbox == {CAROL, ADMIN}
    with pytest.raises(LockedOut):
        allocations.request(db, settings, CAROL, "4090", 1, 1)
    ctx.close()


def test_it_punishes_a_process_once_when_killing_is_off(
    settings: Settings, db: Database, users: dict, procs: list
) -> None:
    settings = settings.with_overrides(kill_violators=False)
    violator = hold_open_as(users[CAROL], gpu(settings, 4))
    procs.append(violator)
    ctx = Context(settings)
    agent = Agent(ctx)
    agent.tick()
    agent.tick(force=True)
    agent.tick(force=True)
    assert violator.poll() is None
    (event,) = violation_events(db)
    assert event.data is not None and event.data["killed"] is False
    with db.session() as s:
        assert lockouts.active(s, CAROL) is not None
    ctx.close()


def test_it_punishes_no_one_when_it_cannot_read_who_holds_what(
    settings: Settings, ctx: Context, users: dict, procs: list
) -> None:
    violator = hold_open_as(users[CAROL], gpu(settings, 3))
    procs.append(violator)
    agent = Agent(ctx)
    take_database_away(ctx, settings)
    agent.tick()
    agent.tick(force=True)
    assert violator.poll() is None
    assert agent.samples[3].processes[0].pid == violator.pid


def test_it_allows_holders_and_former_holders_whose_access_is_being_removed(
    settings: Settings, db: Database
) -> None:
    allocations.request(db, settings, ALICE, "4090", gpu_ids=[0], hours=1)
    (ended,) = allocations.request(db, settings, BOB, "4090", gpu_ids=[1], hours=1)
    allocations.release(db, settings, BOB, ended.id)
    with db.session() as s:
        allowed = violations.allowed_users(s, settings.gpu_host)
    assert allowed == {0: {ALICE}, 1: {BOB}}


def test_it_finds_only_processes_of_users_without_a_right(settings: Settings, users: dict) -> None:
    now = utcnow()

    def sample(index: int, *owners: str) -> GpuSample:
        procs = [GpuProcess(100 + i, pwd.getpwnam(u).pw_uid, u) for i, u in enumerate(owners)]
        return GpuSample(index=index, at=now, processes=procs)

    samples = {0: sample(0, ALICE, CAROL), 1: sample(1, "root", ADMIN)}
    found = violations.suspects(samples, {0: {ALICE}}, violations.exempt(settings))
    assert [(s.gpu_id, s.user) for s in found] == [(0, CAROL), (1, ADMIN)]
    privileged = settings.with_overrides(privileged_gpu_access=True)
    found = violations.suspects(samples, {0: {ALICE}}, violations.exempt(privileged))
    assert [(s.gpu_id, s.user) for s in found] == [(0, CAROL)]
