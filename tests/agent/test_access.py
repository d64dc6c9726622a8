"""Device-file ACLs and ending processes, on real files, real users and real processes."""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from gpulocker.agent import access
from gpulocker.gpus.simulated import ensure_device_file
from tests.helpers import (
    ALICE,
    BOB,
    CAROL,
    EACCES,
    RUN,
    TestUser,
    hold_open_as,
    try_open_as,
    wait_for,
)


@pytest.fixture
def gpu_file(device_dir: Path) -> str:
    """A simulated device file as the driver makes it: 0666, no ACL."""
    path = device_dir / "nvidia0"
    ensure_device_file(path)
    return str(path)


@pytest.fixture
def late_user() -> Iterator[TestUser]:
    """A Linux account created during the test (after any baseline), removed afterwards."""
    yield from make_late_user()


def make_late_user() -> Iterator[TestUser]:
    """Create a fresh account, yield it, remove it (and anything it still runs)."""
    name = f"glt{RUN}_late{uuid.uuid4().hex[:4]}"
    subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", name], check=True)
    entry = pwd.getpwnam(name)
    yield TestUser(name, "", entry.pw_uid, entry.pw_gid, entry.pw_dir)
    subprocess.run(["pkill", "-KILL", "-u", name], check=False)
    subprocess.run(["userdel", "-f", name], check=False)


def test_it_sees_a_driver_made_file_as_open_to_everyone(gpu_file: str, users: dict) -> None:
    current = access.read(gpu_file)
    assert current.mode_text == "0666"
    assert "other::rw- -> ---" in access.baseline_problems(current)
    assert not access.compliant(current, [])
    assert try_open_as(users[CAROL], gpu_file) == 0


def test_it_closes_the_file_to_everyone_but_root(gpu_file: str, users: dict) -> None:
    access.apply(gpu_file, [])
    assert access.compliant(access.read(gpu_file), [])
    for name in (ALICE, BOB, CAROL):
        assert try_open_as(users[name], gpu_file) == EACCES
    os.close(os.open(gpu_file, os.O_RDWR))  # root still can


def test_it_lets_only_the_granted_user_open(gpu_file: str, users: dict) -> None:
    alice, bob = users[ALICE], users[BOB]
    access.apply(gpu_file, [alice.uid])
    assert try_open_as(alice, gpu_file) == 0
    assert try_open_as(bob, gpu_file) == EACCES
    assert access.read(gpu_file).users == {alice.uid: "rw-"}
    access.apply(gpu_file, [])
    assert try_open_as(alice, gpu_file) == EACCES


def test_it_keeps_out_a_user_created_after_the_baseline(
    gpu_file: str, users: dict, late_user: TestUser
) -> None:
    access.apply(gpu_file, [users[ALICE].uid])
    assert try_open_as(late_user, gpu_file) == EACCES


def test_it_finds_a_chmod_666_and_a_stray_entry(gpu_file: str, users: dict) -> None:
    alice, bob = users[ALICE], users[BOB]
    access.apply(gpu_file, [alice.uid])
    os.chmod(gpu_file, 0o666)  # noqa: S103 - the drift under test
    subprocess.run(["setfacl", "-m", f"u:{bob.name}:rw", gpu_file], check=True)
    current = access.read(gpu_file)
    assert "other::rw- -> ---" in access.baseline_problems(current)
    assert current.users == {alice.uid: "rw-", bob.uid: "rw-"}
    assert try_open_as(bob, gpu_file) == 0
    access.apply(gpu_file, [alice.uid])
    assert access.compliant(access.read(gpu_file), [alice.uid])
    assert try_open_as(bob, gpu_file) == EACCES


def test_it_takes_back_a_file_given_to_a_user(gpu_file: str, users: dict) -> None:
    os.chown(gpu_file, users[CAROL].uid, -1)
    assert "owner uid" in access.baseline_problems(access.read(gpu_file))[0]
    access.apply(gpu_file, [])
    assert access.read(gpu_file).owner_uid == 0
    assert try_open_as(users[CAROL], gpu_file) == EACCES


def test_it_removes_named_groups(gpu_file: str, users: dict) -> None:
    subprocess.run(["setfacl", "-m", f"g:{users[CAROL].gid}:rw", gpu_file], check=True)
    assert any(
        p.startswith("removed group:") for p in access.baseline_problems(access.read(gpu_file))
    )
    access.apply(gpu_file, [])
    assert access.read(gpu_file).groups == {}


def test_it_ends_a_holder_with_sigterm(gpu_file: str, users: dict) -> None:
    holder = hold_open_as(users[ALICE], gpu_file)
    reaper = access.Reaper(grace=5.0)
    assert reaper.terminate([holder.pid]) == [holder.pid]
    assert holder.wait(timeout=5) == -signal.SIGTERM
    wait_for(reaper.poll)
    assert not reaper.pending


def test_it_sigkills_a_process_that_ignores_sigterm(users: dict) -> None:
    code = "import signal, sys, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready', flush=True)\ntime.sleep(60)\n"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
    reaper = access.Reaper(grace=0.3)
    reaper.terminate([proc.pid])
    assert not reaper.poll()  # SIGTERM ignored, grace not over
    assert proc.poll() is None
    wait_for(lambda: reaper.poll() and proc.poll() is not None, timeout=5)
    assert proc.wait(timeout=5) == -signal.SIGKILL


def test_it_never_signals_itself_or_init() -> None:
    reaper = access.Reaper(grace=0.1)
    assert reaper.terminate([os.getpid(), 1]) == []
    assert psutil.pid_exists(os.getpid())
