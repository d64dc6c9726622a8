"""The agent on real device files, real users and real processes, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, text

from gpulocker import allocations, events, heartbeat, live
from gpulocker.agent import access, wake
from gpulocker.agent.loop import Agent, start_in_thread
from gpulocker.agent.steps import AgentStep, FunctionStep, StepView
from gpulocker.config import Settings
from gpulocker.context import Context
from gpulocker.db import Database
from gpulocker.gpus.simulated import device_file, ensure_device_file, write_load
from gpulocker.models import Allocation, Event, Gpu, Notification, utcnow
from tests.agent.test_access import make_late_user
from tests.conftest import GPU_CONFIG, REDIS_URL, _admin_conn
from tests.helpers import (
    ADMIN,
    ALICE,
    BOB,
    CAROL,
    EACCES,
    TestUser,
    hold_open_as,
    try_open_as,
    wait_for,
)


@pytest.fixture
def running(ctx: Context) -> Iterator[Agent]:
    """The agent looping in a thread, as `gpulocker serve` runs it."""
    agent, stop, thread = start_in_thread(ctx)
    wait_for(lambda: agent.started and agent.reconciled_at)
    yield agent
    stop.set()
    thread.join(timeout=10)
    assert not thread.is_alive()


def gpu0(settings: Settings) -> str:
    return str(device_file(settings.device_path, 0))


def kinds(db: Database, kind: str) -> list[Event]:
    with db.session() as s:
        return list(s.scalars(select(Event).where(Event.kind == kind).order_by(Event.id)))


@pytest.mark.parametrize("with_redis", [False, True], ids=["no-redis", "redis"])
def test_it_lets_only_the_holder_in_and_ends_them_on_release(
    request: pytest.FixtureRequest, settings: Settings, db: Database, users: dict, with_redis: bool
) -> None:
    if with_redis:
        request.getfixturevalue("redis_client")
        settings = settings.with_overrides(redis_url=REDIS_URL)
    ctx = Context(settings)
    agent, stop, thread = start_in_thread(ctx)
    try:
        wait_for(lambda: agent.reconciled_at)
        alice, bob, path = users[ALICE], users[BOB], gpu0(settings)
        assert try_open_as(alice, path) == EACCES

        (row,) = allocations.request(db, settings, ALICE, "4090", gpu_ids=[0], hours=1)
        wait_for(lambda: alice.uid in access.read(path).users, timeout=5)
        assert try_open_as(alice, path) == 0
        assert try_open_as(bob, path) == EACCES
        wait_for(lambda: allocations_row(db, row.id).access_applied_at)

        holder = hold_open_as(alice, path)
        allocations.release(db, settings, ALICE, row.id)
        assert holder.wait(timeout=2 + settings.kill_grace_seconds) == -signal.SIGTERM
        assert try_open_as(alice, path) == EACCES
        wait_for(lambda: allocations_row(db, row.id).access_removed_at)
        (removed,) = kinds(db, "access_removed")
        assert removed.data == {"pids": [holder.pid]}
        assert kinds(db, "violation") == []
        if with_redis:
            assert (settings.gpu_host, 0) in live.read(ctx)
    finally:
        stop.set()
        thread.join(timeout=10)
        ctx.close()


def allocations_row(db: Database, allocation_id: int) -> Allocation:
    with db.session() as s:
        row = s.get(Allocation, allocation_id)
        assert row is not None
        return row


def test_it_undoes_drift_within_reconcile_seconds(
    running: Agent, db: Database, settings: Settings, users: dict
) -> None:
    alice, bob, path = users[ALICE], users[BOB], gpu0(settings)
    allocations.request(db, settings, ALICE, "4090", gpu_ids=[0], hours=1)
    wait_for(lambda: try_open_as(alice, path) == 0)
    os.chmod(path, 0o666)  # noqa: S103 - the driver's helper does this
    subprocess.run(["setfacl", "-m", f"u:{bob.name}:rw", path], check=True)
    wait_for(lambda: access.compliant(access.read(path), [alice.uid]), timeout=5, interval=0.02)
    assert try_open_as(bob, path) == EACCES
    assert try_open_as(alice, path) == 0
    # The watch may undo the chmod before the setfacl happens: one drift event or two,
    # and the second may be written a moment after the file is right again.
    wait_for(lambda: f"removed user:{bob.name}:rw-" in changes_of(db))
    drifts = kinds(db, "drift")
    assert {d.gpu_id for d in drifts} == {0}
    assert "other::rw- -> ---" in changes_of(db)


def changes_of(db: Database) -> list[str]:
    """Every change the drift events recorded, in order."""
    return [c for d in kinds(db, "drift") for c in (d.data or {}).get("changes", [])]


def test_it_undoes_drift_at_once_without_waiting_for_reconcile_seconds(
    settings: Settings, db: Database, users: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every periodic check a minute apart: only the file's change explains a quick fix.
    settings = settings.with_overrides(reconcile_seconds=60.0)
    monkeypatch.setattr(wake, "BACKSTOP_SECONDS", 60.0)
    ctx = Context(settings)
    agent, stop, thread = start_in_thread(ctx)
    try:
        wait_for(lambda: agent.reconciled_at)
        bob, path = users[BOB], gpu0(settings)
        subprocess.run(["setfacl", "-m", f"u:{bob.name}:rw", path], check=True)
        wait_for(lambda: access.compliant(access.read(path), []), timeout=10, interval=0.01)
        os.unlink(path)
        ensure_device_file(Path(path))
        wait_for(lambda: access.compliant(access.read(path), []), timeout=10, interval=0.01)
        assert try_open_as(bob, path) == EACCES
    finally:
        stop.set()
        thread.join(timeout=10)
        ctx.close()


def test_it_restores_a_recreated_file_and_its_holder(
    running: Agent, db: Database, settings: Settings, users: dict
) -> None:
    alice, path = users[ALICE], gpu0(settings)
    allocations.request(db, settings, ALICE, "4090", gpu_ids=[0], hours=1)
    wait_for(lambda: try_open_as(alice, path) == 0)
    os.unlink(path)
    ensure_device_file(Path(path))  # the driver re-creates it 0666, ACL gone
    wait_for(lambda: access.compliant(access.read(path), [alice.uid]), timeout=5)
    assert try_open_as(users[CAROL], path) == EACCES
    wait_for(lambda: kinds(db, "drift"))
    (drift,) = kinds(db, "drift")
    assert drift.data is not None
    assert "mode 0666" in drift.data["changes"]
    assert f"restored missing user:{ALICE}:rw-" in drift.data["changes"]


def test_it_sees_a_grant_that_commits_after_a_newer_event(
    settings: Settings, db: Database, users: dict
) -> None:
    if db.is_sqlite:
        pytest.skip("SQLite has one writer at a time: its event ids always commit in order")
    settings = settings.with_overrides(reconcile_seconds=60.0)  # only the change poll counts
    ctx = Context(settings)
    agent = Agent(ctx)
    agent.tick()
    alice, bob = users[ALICE], users[BOB]
    with db.transaction() as slow:  # takes the lower event id, commits last
        now = utcnow()
        slow.add(
            Allocation(
                user=ALICE,
                host=settings.gpu_host,
                gpu_id=0,
                gpu_type="4090",
                device=gpu0(settings),
                created_at=now,
                expires_at=now + timedelta(hours=1),
                state="active",
            )
        )
        events.record(slow, "granted", ALICE, "GPU 0", user=ALICE, host=settings.gpu_host)
        slow.flush()
        allocations.request(db, settings, BOB, "4090", gpu_ids=[1], hours=1)
        wait_for(lambda: agent.tick().get("reconcile"), timeout=2)
        assert try_open_as(bob, str(device_file(settings.device_path, 1))) == 0
    wait_for(lambda: agent.tick().get("reconcile"), timeout=5)  # not the minute's full pass
    assert try_open_as(alice, gpu0(settings)) == 0
    ctx.close()


def test_it_keeps_a_user_created_later_out_of_every_gpu(
    ctx: Context, settings: Settings, late_user: TestUser
) -> None:
    for ids in GPU_CONFIG.values():
        for gpu_id in ids:
            assert try_open_as(late_user, str(device_file(settings.device_path, gpu_id))) == EACCES


@pytest.fixture
def late_user(ctx: Context, users: dict) -> Iterator[TestUser]:
    """The baseline is set first (one agent tick); then a new account appears."""
    Agent(ctx).tick()
    yield from make_late_user()


def test_it_leaves_unmanaged_files_alone(ctx: Context, settings: Settings) -> None:
    others = [settings.device_path / n for n in ("nvidiactl", "nvidia-uvm", "nvidia9")]
    for path in others:
        ensure_device_file(path)
    Agent(ctx).tick()
    for path in others:
        current = access.read(path)
        assert current.mode_text == "0666" and "mask::" not in current.base
    assert access.compliant(access.read(gpu0(settings)), [])


def test_it_gives_standing_access_to_exempt_users_and_privileged_admins(
    settings: Settings, db: Database, users: dict
) -> None:
    settings = settings.with_overrides(exempt_users=("root", BOB), privileged_gpu_access=True)
    ctx = Context(settings)
    Agent(ctx).tick()
    path = gpu0(settings)
    assert try_open_as(users[BOB], path) == 0
    assert try_open_as(users[ADMIN], path) == 0
    assert try_open_as(users[ALICE], path) == EACCES
    ctx.close()


def test_it_keeps_enforcing_when_the_database_is_gone(
    ctx: Context, db: Database, settings: Settings, users: dict
) -> None:
    alice, bob, path = users[ALICE], users[BOB], gpu0(settings)
    allocations.request(db, settings, ALICE, "4090", gpu_ids=[0], hours=1)
    agent = Agent(ctx)
    agent.tick()
    assert try_open_as(alice, path) == 0
    take_database_away(ctx, settings)
    os.chmod(path, 0o666)  # noqa: S103 - drift during the outage
    subprocess.run(["setfacl", "-m", f"u:{bob.name}:rw", path], check=True)
    agent.reconcile()
    assert not agent.db_ok
    assert try_open_as(bob, path) == EACCES
    assert try_open_as(alice, path) == 0  # nobody revoked because a read failed
    agent.tick(force=True)  # every step meets the outage; none stops the loop
    assert agent.status()["db_ok"] is False
    assert try_open_as(alice, path) == 0 and try_open_as(bob, path) == EACCES


def take_database_away(ctx: Context, settings: Settings) -> None:
    """A real outage: the PostgreSQL database is dropped; the SQLite file is replaced by a
    directory, so no connection can open it."""
    ctx.db.dispose()
    if settings.database_url.startswith("sqlite"):
        path = Path(settings.database_url.removeprefix("sqlite:///"))
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        path.mkdir()
        return
    name = settings.database_url.rsplit("/", 1)[1]
    with _admin_conn() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_it_marks_a_failed_gpu_and_tells_the_admins_once(ctx: Context, settings: Settings) -> None:
    agent = Agent(ctx)
    agent.tick()
    write_load(settings.device_path, 2, error="GPU is lost")
    agent.tick(force=True)
    agent.tick(force=True)
    with ctx.db.session() as s:
        gpu = s.scalar(select(Gpu).where(Gpu.gpu_id == 2))
        inbox = s.scalars(select(Notification).where(Notification.user == ADMIN)).all()
    assert gpu is not None and not gpu.healthy and gpu.error == "GPU is lost"
    assert [n.kind for n in inbox] == ["gpu_unhealthy"]
    write_load(settings.device_path, 2, utilization=5)
    agent.tick(force=True)
    with ctx.db.session() as s:
        gpu = s.scalar(select(Gpu).where(Gpu.gpu_id == 2))
    assert gpu is not None and gpu.healthy


def test_it_publishes_samples_and_beats(ctx: Context, settings: Settings) -> None:
    agent = Agent(ctx)
    write_load(settings.device_path, 1, utilization=42, memory_mib=1000)
    agent.tick()
    published = live.read(ctx)
    assert published[(settings.gpu_host, 1)]["utilization"] == 42
    with ctx.db.session() as s:
        beat = heartbeat.last(s, heartbeat.agent_name(settings.gpu_host))
    assert beat is not None and beat.data is not None
    assert beat.data["pid"] == os.getpid() and beat.data["gpus"] == 6


def test_a_failing_step_does_not_stop_the_others(ctx: Context) -> None:
    def broken(view: StepView) -> bool:
        raise RuntimeError("one bad row")

    ran: list[str] = []

    def fine(view: StepView) -> bool:
        ran.append("fine")
        return True

    steps: list[AgentStep] = [
        FunctionStep("broken", broken, lambda s: 1.0),
        FunctionStep("fine", fine, lambda s: 1.0),
    ]
    agent = Agent(ctx, steps=steps)
    assert agent.tick() == {"broken": False, "fine": True}
    assert agent.tick() == {}  # neither is due again yet
    assert ran == ["fine"]


# --- the agent as a real process


def agent_env(settings: Settings) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "GPULOCKER_ENV_FILE": "/dev/null",
        "DATABASE_URL": settings.database_url,
        "STATE_DIR": str(settings.state_dir),
        "GPU_BACKEND": "simulated",
        "GPU_CONFIG": json.dumps(settings.gpu_config),
        "DEVICE_DIR": str(settings.device_path),
        "GPU_HOST": settings.gpu_host,
        "PRIVILEGED_USERS": ",".join(settings.privileged_users),
        "RECONCILE_SECONDS": "5",
        "KILL_GRACE_SECONDS": "1",
        "SECRET_KEY": "test-secret-key",
        "SOCKET_PATH": str(settings.local_socket_path),  # never the system's /run/gpulocker
    }


def start_agent_process(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "gpulocker", "agent"],
        env=agent_env(settings),
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


def beat_from(db: Database, settings: Settings, pid: int) -> bool:
    with db.session() as s:
        beat = heartbeat.last(s, heartbeat.agent_name(settings.gpu_host))
        return beat is not None and beat.data is not None and beat.data.get("pid") == pid


def freeze_between_transactions(proc: subprocess.Popen[bytes], db: Database) -> None:
    """SIGSTOP the agent at a moment it holds no transaction open. Frozen inside one (a
    heartbeat, a sample) it would hold SQLite's write lock, or PostgreSQL row locks, and
    the test's own writes would wait for a process that never comes back."""
    for _ in range(100):
        proc.send_signal(signal.SIGSTOP)
        if not in_a_transaction(db):
            return
        proc.send_signal(signal.SIGCONT)
        time.sleep(0.02)
    raise AssertionError("the agent was inside a transaction at every try")


def in_a_transaction(db: Database) -> bool:
    """Whether another connection has a transaction open on the test's database."""
    if db.is_sqlite:
        probe = sqlite3.connect(db.url.split("///", 1)[1], timeout=0.05, isolation_level=None)
        try:
            probe.execute("BEGIN IMMEDIATE")
            probe.execute("ROLLBACK")
            return False
        except sqlite3.OperationalError:  # the write lock is held
            return True
        finally:
            probe.close()
    with db.session() as session:
        return bool(
            session.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND pid <> pg_backend_pid()"
                    " AND (state = 'active' OR state LIKE 'idle in transaction%')"
                )
            )
        )


def test_it_repairs_everything_after_kill_9_between_database_and_file(
    db: Database, settings: Settings, users: dict, tmp_path: Path
) -> None:
    alice, bob, path = users[ALICE], users[BOB], gpu0(settings)
    log = tmp_path / "agent.log"
    first = start_agent_process(settings, log)
    try:
        wait_for(lambda: beat_from(db, settings, first.pid), timeout=30)
        (row,) = allocations.request(db, settings, ALICE, "4090", gpu_ids=[0], hours=1)
        wait_for(lambda: try_open_as(alice, path) == 0)
        holder = hold_open_as(alice, path)

        freeze_between_transactions(first, db)  # frozen after its last reconcile...
        allocations.release(db, settings, ALICE, row.id)  # ...the database changes...
        allocations.request(db, settings, BOB, "4090", gpu_ids=[0], hours=1)
        first.kill()  # ...and it dies before touching the file
        first.wait(timeout=10)
        assert try_open_as(alice, path) == 0 and try_open_as(bob, path) == EACCES

        second = start_agent_process(settings, log)
        try:
            wait_for(lambda: beat_from(db, settings, second.pid), timeout=30)
            # The first beat comes after the first reconcile: the state is right at once.
            assert try_open_as(bob, path) == 0
            assert try_open_as(alice, path) == EACCES
            assert holder.wait(timeout=5) == -signal.SIGTERM
            second.send_signal(signal.SIGTERM)
            assert second.wait(timeout=15) == 0
        finally:
            if second.poll() is None:
                second.kill()
    finally:
        if first.poll() is None:
            first.kill()
    assert "stopped" in log.read_text()


def test_the_command_refuses_a_bad_configuration(settings: Settings) -> None:
    env = agent_env(settings) | {"RECONCILE_SECONDS": "soon"}
    proc = subprocess.run(
        [sys.executable, "-m", "gpulocker", "agent"], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "RECONCILE_SECONDS" in proc.stderr
