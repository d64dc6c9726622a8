"""The watch puts a changed device file back from the plan the agent last applied, without
the database (SPEC §13), and that plan never re-opens what a revoke closed: real files,
real users, the agent running in its threads, on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from gpulocker import allocations
from gpulocker.agent import access
from gpulocker.agent.loop import Agent
from gpulocker.agent.reconcile import Plan
from gpulocker.config import Settings
from gpulocker.context import Context
from gpulocker.gpus.simulated import device_file
from tests.conftest import needs_root
from tests.helpers import ALICE, TestUser, wait_for

pytestmark = needs_root


@dataclass
class Running:
    agent: Agent
    gate: threading.Event  # cleared: every read of the plan from the database blocks
    reads: list[float]  # how many plan reads started

    def path(self, gpu_id: int) -> str:
        return str(device_file(self.agent.settings.device_path, gpu_id))


@pytest.fixture
def running(settings: Settings, db: object) -> Iterator[Running]:
    """An agent with no periodic step at all (only its wake and watch threads act), whose
    reads of the plan can be held at a gate."""
    ctx = Context(settings.with_overrides(reconcile_seconds=3600.0))
    agent = Agent(ctx, steps=[])
    gate = threading.Event()
    gate.set()
    reads: list[float] = []
    read_plan: Callable[[], Plan | None] = agent.reconciler.read_plan

    def gated() -> Plan | None:
        reads.append(1.0)
        gate.wait(timeout=30)
        return read_plan()

    agent.reconciler.read_plan = gated  # type: ignore[method-assign]
    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stop,), daemon=True)
    thread.start()
    wait_for(lambda: agent.reconciled_at and agent.waker)
    yield Running(agent, gate, reads)
    gate.set()
    stop.set()
    thread.join(timeout=10)
    assert not thread.is_alive()
    ctx.close()


def mode(path: str) -> str:
    return access.read(path).mode_text


def named(path: str) -> set[int]:
    return set(access.read(path).users)


def test_a_chmod_is_undone_while_the_database_is_not_read(
    running: Running, settings: Settings, users: dict[str, TestUser]
) -> None:
    path, alice = running.path(0), users[ALICE]
    allocations.request(running.agent.ctx.db, settings, ALICE, "4090", gpu_ids=[0])
    wait_for(lambda: named(path) == {alice.uid}, timeout=5)
    running.gate.clear()  # from now on a reconcile would hang in the database
    before = running.agent.watch_restores
    for _ in range(3):
        os.chmod(path, 0o666)  # noqa: S103 - what nvidia-modprobe does
        wait_for(lambda: mode(path) == "0660", timeout=2, interval=0.002)
        assert named(path) == {alice.uid}  # the holder kept, from the plan in memory
    assert running.agent.watch_restores >= before + 1


def test_a_restore_never_reopens_what_a_revoke_closed(
    running: Running, settings: Settings, users: dict[str, TestUser]
) -> None:
    db, path, alice = running.agent.ctx.db, running.path(1), users[ALICE]
    (row,) = allocations.request(db, settings, ALICE, "4090", gpu_ids=[1])
    wait_for(lambda: named(path) == {alice.uid}, timeout=5)
    allocations.release(db, settings, ALICE, row.id)
    wait_for(lambda: named(path) == set(), timeout=5)  # the revoke reached the file
    os.chmod(path, 0o666)  # noqa: S103
    wait_for(lambda: mode(path) == "0660", timeout=2, interval=0.002)
    assert named(path) == set()  # restored from the newest plan: alice stays out


def test_a_restore_between_a_revoke_and_its_reconcile_leaves_it_to_the_reconcile(
    running: Running, settings: Settings, users: dict[str, TestUser]
) -> None:
    """The revoke is committed but its reconcile is held in the database: a restore then
    writes back what the file had (the agent's last plan), nothing more open; when the
    reconcile goes on it closes the file."""
    db, path, alice = running.agent.ctx.db, running.path(2), users[ALICE]
    (row,) = allocations.request(db, settings, ALICE, "4090", gpu_ids=[2])
    wait_for(lambda: named(path) == {alice.uid}, timeout=5)
    running.gate.clear()
    reads = len(running.reads)
    allocations.release(db, settings, ALICE, row.id)
    wait_for(lambda: len(running.reads) > reads, timeout=5)  # the reconcile is at the gate
    os.chmod(path, 0o666)  # noqa: S103
    wait_for(lambda: mode(path) == "0660", timeout=2, interval=0.002)
    assert named(path) == {alice.uid}  # exactly as the agent last left it
    running.gate.set()
    wait_for(lambda: named(path) == set(), timeout=5)
    assert mode(path) == "0660"


def test_without_inotify_for_the_files_a_woken_agent_still_polls_them(
    settings: Settings, db: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Changes still wake it (a waker), but the files are not watched: their stat poll
    runs every 0.2 s again, not the 5 s backstop of the change check."""
    from gpulocker.agent import wake, watch

    monkeypatch.setattr(watch, "open_watch", lambda paths: None)
    monkeypatch.setattr(wake, "BACKSTOP_SECONDS", 60.0)  # only the poll can be quick
    ctx = Context(settings.with_overrides(reconcile_seconds=3600.0))
    agent = Agent(ctx)
    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_for(lambda: agent.reconciled_at and agent.waker)
        path = str(device_file(settings.device_path, 3))
        for _ in range(3):
            os.chmod(path, 0o666)  # noqa: S103
            wait_for(lambda: mode(path) == "0660", timeout=10, interval=0.005)
        assert agent.watch_restores == 0
    finally:
        stop.set()
        thread.join(timeout=10)
        ctx.close()
