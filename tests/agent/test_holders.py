"""Holders found by what they hold, SIGKILL for violators, IGNORED_PROCESSES, the inotify
watch: real users, real processes, real files, on SQLite and PostgreSQL."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from sqlalchemy import select

from gpulocker import allocations, ignored
from gpulocker.agent import access, holders
from gpulocker.agent.loop import Agent
from gpulocker.config import ConfigError, Settings, load_settings
from gpulocker.context import Context
from gpulocker.db import Database
from gpulocker.gpus import GpuProcess, GpuSample
from gpulocker.gpus.simulated import device_file, ensure_device_file
from gpulocker.models import Event, utcnow
from tests.helpers import ALICE, CAROL, TestUser, wait_for


def gpu(settings: Settings, gpu_id: int) -> str:
    return str(device_file(settings.device_path, gpu_id))


def other_path(settings: Settings, gpu_id: int) -> str:
    """A second name for the GPU's file (a hard link in another folder), as a bind mount
    or a copied device node would give."""
    folder = settings.device_path.parent / "elsewhere"
    folder.mkdir(mode=0o755, exist_ok=True)
    link = folder / f"card{gpu_id}"
    ensure_device_file(Path(gpu(settings, gpu_id)))
    if not link.exists():
        os.link(gpu(settings, gpu_id), link)
    return str(link)


@pytest.fixture
def pids() -> Iterator[list[int]]:
    """Pids started by a test (not necessarily its children), SIGKILLed afterwards."""
    started: list[int] = []
    yield started
    for pid in started:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def descriptor_only_holder(path: str, uid: int, gid: int, program: str = "/bin/sleep") -> int:
    """As `uid`, open `path`, hand the descriptor to a child running `program` (which never
    opens anything itself) and exit: the child only holds the descriptor. Its pid."""
    code = (
        "import os, subprocess, sys\n"
        f"fd = os.open({path!r}, os.O_RDWR)\n"
        f"child = subprocess.Popen([{program!r}, '600'], pass_fds=[fd], start_new_session=True,"
        " stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "print(child.pid)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        user=uid,
        group=gid,
        extra_groups=[],
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        check=True,
        text=True,
    )
    return int(out.stdout.strip())


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_the_sweep_finds_a_descriptor_only_holder_through_another_path(
    settings: Settings, users: dict[str, TestUser], pids: list[int]
) -> None:
    alice = users[ALICE]
    link = other_path(settings, 0)
    pid = descriptor_only_holder(link, alice.uid, alice.gid)
    pids.append(pid)
    sample = GpuSample(index=0, at=utcnow())  # what NVML says: nobody
    holders.unite([sample], {0: gpu(settings, 0), 1: gpu(settings, 1)}, settings)
    assert [(p.pid, p.user) for p in sample.processes] == [(pid, ALICE)]
    assert holders.holding(gpu(settings, 0), alice.uid) == [pid]
    assert holders.holding(gpu(settings, 1), alice.uid) == []


def test_revoke_ends_a_holder_that_opened_the_gpu_through_another_path(
    ctx: Context, settings: Settings, db: Database, users: dict[str, TestUser], pids: list[int]
) -> None:
    alice = users[ALICE]
    (row,) = allocations.request(db, settings, ALICE, "4090", gpu_ids=[0], hours=1)
    agent = Agent(ctx)
    agent.tick()
    assert alice.uid in access.read(gpu(settings, 0)).users
    pid = descriptor_only_holder(other_path(settings, 0), alice.uid, alice.gid)
    pids.append(pid)

    allocations.release(db, settings, ALICE, row.id)
    agent.tick(force=True)
    wait_for(lambda: gone(pid), timeout=3)
    wait_for(lambda: agent.tick(force=True) and row_removed(db, row.id), timeout=5)
    with db.session() as s:
        removed = s.scalars(select(Event).where(Event.kind == "access_removed")).one()
    assert removed.data == {"pids": [pid]}


def row_removed(db: Database, allocation_id: int) -> bool:
    from gpulocker.models import Allocation

    with db.session() as s:
        row = s.get(Allocation, allocation_id)
        return row is not None and row.access_removed_at is not None


def test_a_violator_that_ignores_sigterm_is_dead_within_one_sample(
    ctx: Context, settings: Settings, db: Database, users: dict[str, TestUser]
) -> None:
    carol = users[CAROL]
    code = (
        "import os, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"fd = os.open({other_path(settings, 1)!r}, os.O_RDWR)\n"
        "print('open', flush=True)\n"
        "while True: time.sleep(60)\n"
    )
    violator = subprocess.Popen(
        [sys.executable, "-c", code],
        user=carol.uid,
        group=carol.gid,
        extra_groups=[],
        cwd="/",
        stdout=subprocess.PIPE,
    )
    try:
        assert violator.stdout is not None and violator.stdout.readline() == b"open\n"
        Agent(ctx).tick()  # one sample, one violation check
        assert violator.wait(timeout=2) == -signal.SIGKILL
    finally:
        if violator.poll() is None:
            violator.kill()
    with db.session() as s:
        (event,) = s.scalars(select(Event).where(Event.kind == "violation")).all()
    assert event.user == CAROL and event.data is not None and event.data["pids"] == [violator.pid]


def test_ignored_processes_are_never_punished_but_a_student_named_xorg_is(
    ctx: Context, settings: Settings, db: Database, users: dict[str, TestUser], pids: list[int]
) -> None:
    xorg = settings.device_path.parent / "bin" / "Xorg"
    xorg.parent.mkdir(mode=0o755)
    shutil.copy("/bin/sleep", xorg)
    xorg.chmod(0o755)
    daemon = pwd.getpwnam("daemon")  # a system account, not exempt
    ensure_device_file(Path(gpu(settings, 2)))
    system = descriptor_only_holder(gpu(settings, 2), daemon.pw_uid, daemon.pw_gid, str(xorg))
    carol = users[CAROL]
    student = descriptor_only_holder(gpu(settings, 2), carol.uid, carol.gid, str(xorg))
    pids += [system, student]

    agent = Agent(ctx)
    agent.tick()
    wait_for(lambda: gone(student), timeout=3)
    agent.tick(force=True)
    assert not gone(system)
    shown = {p.pid: p.ignored for p in agent.samples[2].processes}
    assert shown == {system: True}
    with db.session() as s:
        users_punished = [e.user for e in s.scalars(select(Event).where(Event.kind == "violation"))]
    assert users_punished == [CAROL]


def test_ignored_rules_name_user_and_command(settings: Settings) -> None:
    rules = ignored.parse(["Xorg", "gdm:gnome-shell"])
    assert rules == (ignored.Rule(None, "Xorg"), ignored.Rule("gdm", "gnome-shell"))
    me = os.getpid()
    assert ignored.matches(rules, me, 0, "root", "Xorg")
    assert not ignored.matches(rules, me, 5000, "student", "Xorg")  # a name alone is not enough
    assert ignored.matches(rules, me, 5000, "gdm", "gnome-shell")
    assert not ignored.matches(rules, me, 120, "other", "gnome-shell")
    assert settings.ignored_processes[:2] == ("Xorg", "Xwayland")
    with pytest.raises(ConfigError, match="IGNORED_PROCESSES"):
        load_settings(
            {
                "STATE_DIR": "/tmp/gpulocker-config-test",
                "GPULOCKER_ENV_FILE": "/dev/null",
                "IGNORED_PROCESSES": "Xorg, bad name",
            }
        )


def test_a_chmod_is_undone_by_the_inotify_watch_not_by_polling(
    ctx: Context, settings: Settings
) -> None:
    path = gpu(settings, 3)
    agent = Agent(ctx, steps=[])  # no periodic step at all: only the watch can reconcile
    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_for(lambda: agent.reconciled_at)
        assert access.read(path).mode_text == "0660"
        before = agent.watch_restores
        for _ in range(3):
            os.chmod(path, 0o666)  # noqa: S103 - what nvidia-modprobe does
            wait_for(lambda: access.read(path).mode_text == "0660", timeout=2)
        # No step runs at all (steps=[]): only the watch thread can have restored it.
        assert agent.watch_restores > before
        os.unlink(path)  # re-created, as the driver would: the folder watch hears it
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o666)
        os.close(fd)
        os.chmod(path, 0o666)  # noqa: S103
        wait_for(lambda: access.read(path).mode_text == "0660", timeout=2)
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive()
    assert Path(path).exists()


def test_an_ignored_process_is_not_the_holders_activity(settings: Settings) -> None:
    from gpulocker import policies
    from gpulocker.models import Allocation

    now = utcnow()
    row = Allocation(host=settings.gpu_host, gpu_id=0, user="gdm")
    sample = GpuSample(index=0, at=now)
    sample.processes = [GpuProcess(10, 120, "gdm", 150.0, "gnome-shell", ignored=True)]
    live = {(settings.gpu_host, 0): sample.to_dict()}
    assert policies.holder_processes(settings, live, row, now) == []  # idle, not busy
    sample.processes.append(GpuProcess(11, 120, "gdm", 1.0, "python"))
    live = {(settings.gpu_host, 0): sample.to_dict()}
    assert [p["pid"] for p in policies.holder_processes(settings, live, row, now) or []] == [11]
