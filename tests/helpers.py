"""Shared test helpers: the standing test users and running things as them."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

# Names are unique per test run, so runs in parallel never delete each other's users.
RUN = os.environ.get("GLT_RUN") or str(os.getpid() % 100000)
ALICE = f"glt{RUN}_alice"  # holds GPUs
BOB = f"glt{RUN}_bob"  # another user
CAROL = f"glt{RUN}_carol"  # never allocates
ADMIN = f"glt{RUN}_admin"  # in PRIVILEGED_USERS
ALL_USERS = (ALICE, BOB, CAROL, ADMIN)


@dataclass(frozen=True)
class TestUser:
    """A real Linux account made for the tests."""

    name: str
    password: str
    uid: int
    gid: int
    home: str

    __test__ = False  # not a test class


def password_for(name: str) -> str:
    """Each test user's password (the users exist only during the test session)."""
    return f"pw-{name}-Secret1"


def try_open_as(user: TestUser, path: str) -> int:
    """Open `path` read/write as `user` in a child process; 0 if it worked, else the errno."""
    code = (
        "import os, sys\n"
        "try:\n"
        f"    os.close(os.open({path!r}, os.O_RDWR))\n"
        "except OSError as e:\n"
        "    sys.exit(e.errno)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        user=user.uid,
        group=user.gid,
        extra_groups=[],
        check=False,
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
    )
    return proc.returncode


def hold_open_as(user: TestUser, path: str) -> subprocess.Popen[bytes]:
    """Start a process as `user` that opens `path` and keeps it open until killed.

    Waits until the file is really open, so the caller can rely on it being seen.
    """
    code = (
        "import os, sys, time\n"
        f"fd = os.open({path!r}, os.O_RDWR)\n"
        "sys.stdout.write('open\\n'); sys.stdout.flush()\n"
        "while True: time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        user=user.uid,
        group=user.gid,
        extra_groups=[],
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != b"open":
        proc.kill()
        raise AssertionError(f"{user.name} could not open {path}")
    return proc


def wait_for(
    predicate: Callable[[], object], timeout: float = 5.0, interval: float = 0.05
) -> object:
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


EACCES = errno.EACCES
IS_ROOT = os.geteuid() == 0


def cuda(*gpu_ids: int, host: str = "testhost") -> str:
    """CUDA_VISIBLE_DEVICES for simulated GPUs of the test host: their UUIDs, in order."""
    from gpulocker.gpus.simulated import simulated_uuid

    return ",".join(simulated_uuid(host, i) for i in sorted(gpu_ids))


def export(*gpu_ids: int, host: str = "testhost") -> str:
    """The CLI's export line for those GPUs."""
    return f"export CUDA_DEVICE_ORDER=PCI_BUS_ID CUDA_VISIBLE_DEVICES={cuda(*gpu_ids, host=host)}"
