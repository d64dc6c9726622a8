"""The agent wakes on a change (SPEC §10): a commit reaches the device file at once, with
the periodic checks set far apart, on SQLite (inotify on the log) and PostgreSQL (LISTEN)."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest
from sqlalchemy import select

from gpulocker import allocations, changes, events
from gpulocker.agent import access, wake
from gpulocker.agent.loop import Agent, start_in_thread
from gpulocker.agent.steps import FunctionStep
from gpulocker.config import Settings
from gpulocker.context import Context
from gpulocker.gpus.simulated import device_file
from gpulocker.models import Event
from tests.conftest import needs_root
from tests.helpers import ALICE, BOB, TestUser, wait_for

pytestmark = needs_root


@pytest.fixture
def slow_settings(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Full reconciles and the backstop change check a minute apart: only a wake-up
    explains a grant within seconds (how quick it is, is bench/bench_agent.py's)."""
    monkeypatch.setattr(wake, "BACKSTOP_SECONDS", 60.0)
    return settings.with_overrides(reconcile_seconds=60.0)


@pytest.fixture
def woken(slow_settings: Settings, db: object) -> Iterator[Agent]:
    ctx = Context(slow_settings)
    agent, stop, thread = start_in_thread(ctx)
    wait_for(lambda: agent.started and agent.reconciled_at and agent.waker, timeout=10)
    time.sleep(0.3)  # let the first ticks' own writes settle
    yield agent
    stop.set()
    thread.join(timeout=10)
    assert not thread.is_alive()
    ctx.close()


def _holders(path: str) -> set[str]:
    return {access.user_label(uid) for uid in access.read(path).users}


def test_a_grant_and_a_release_reach_the_file_at_once(
    woken: Agent, slow_settings: Settings, users: dict[str, TestUser]
) -> None:
    assert woken.waker is not None
    expected = "sqlite-inotify" if woken.ctx.db.is_sqlite else "pg-listen"
    assert expected in woken.waker.sources
    ctx = woken.ctx
    path = str(device_file(slow_settings.device_path, 0))
    for _round in range(3):
        (row,) = allocations.request(ctx.db, slow_settings, ALICE, "4090", gpu_ids=[0])
        wait_for(lambda: ALICE in _holders(path), timeout=10, interval=0.005)
        allocations.release(ctx.db, slow_settings, ALICE, row.id)
        wait_for(lambda: ALICE not in _holders(path), timeout=10, interval=0.005)


def test_drift_is_undone_at_once(woken: Agent, slow_settings: Settings, users: object) -> None:
    path = str(device_file(slow_settings.device_path, 1))
    subprocess.run(["setfacl", "-m", f"u:{BOB}:rw", path], check=True)
    wait_for(lambda: BOB not in _holders(path), timeout=10, interval=0.005)


def test_postgres_announces_a_change_only_when_it_commits(ctx: Context) -> None:
    if ctx.db.is_sqlite:
        pytest.skip("NOTIFY is PostgreSQL's; SQLite is watched with inotify")
    url = ctx.db.url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url, autocommit=True) as listener:
        listener.execute(f"LISTEN {changes.CHANNEL}")
        with pytest.raises(RuntimeError), ctx.db.transaction() as session:
            events.record(session, "test", "root", "rolled back", host="gpu-x")
            raise RuntimeError("abort")
        assert list(listener.notifies(timeout=0.3, stop_after=1)) == []
        with ctx.db.transaction() as session:
            events.record(session, "test", "root", "kept", host="gpu-x")
            events.record(session, "test", "root", "kept too", host="gpu-x")
        notes = list(listener.notifies(timeout=2, stop_after=1))
        assert [(n.channel, n.payload) for n in notes] == [(changes.CHANNEL, "gpu-x")]


def test_a_grant_reaches_the_file_while_the_loop_is_busy(
    slow_settings: Settings, db: object, users: dict[str, TestUser]
) -> None:
    """The wake thread reconciles on its own: a step that takes seconds (a sample on a
    busy host) does not delay a grant."""
    busy, done = threading.Event(), threading.Event()

    def slow_step(_view: object) -> bool:
        busy.set()
        done.wait(30)  # busy until the test has seen the grant on the file
        return False

    ctx = Context(slow_settings)
    agent = Agent(ctx, steps=[FunctionStep("slow", slow_step, lambda settings: 0.0)])
    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_for(lambda: busy.is_set() and agent.waker, timeout=10)
        path = str(device_file(slow_settings.device_path, 0))
        allocations.request(ctx.db, slow_settings, ALICE, "4090", gpu_ids=[0])
        wait_for(lambda: ALICE in _holders(path), timeout=10, interval=0.005)
        assert not done.is_set()  # the loop is still inside the step
    finally:
        done.set()
        stop.set()
        thread.join(timeout=10)
        ctx.close()
    assert not thread.is_alive()


def test_the_change_count_moves_with_the_database_while_the_agent_hears_it(
    woken: Agent, slow_settings: Settings, users: dict[str, TestUser]
) -> None:
    count = woken.change_count()
    assert count is not None
    allocations.request(woken.ctx.db, slow_settings, ALICE, "4090", gpu_ids=[1])
    wait_for(lambda: (woken.change_count() or 0) > count, timeout=2, interval=0.005)
    idle = Agent(woken.ctx, steps=[])
    assert idle.change_count() is None  # not running: a step reads the database itself
    idle.close()


def test_the_sqlite_commit_mark_moves_with_a_commit_and_not_with_a_read(
    slow_settings: Settings, db: object, users: dict[str, TestUser]
) -> None:
    from gpulocker.agent.wake import Waker

    if not slow_settings.database_url.startswith("sqlite"):
        pytest.skip("the mark is SQLite's wal-index header")
    ctx = Context(slow_settings)
    waker = Waker(slow_settings.database_url, slow_settings.gpu_host)
    try:
        with ctx.db.transaction() as session:  # the log and its index exist from here on
            events.record(session, "test", "root", "first")
        mark = waker.commit_mark()
        assert mark is not None
        with ctx.db.session() as session:
            session.execute(select(Event.id)).all()
        assert waker.commit_mark() == mark
        with ctx.db.transaction() as session:
            events.record(session, "test", "root", "second")
        assert waker.commit_mark() != mark
    finally:
        waker.close()
        ctx.close()
