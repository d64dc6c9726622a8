# ruff: noqa: F811  (the socket fixtures of test_cli are imported, then used as arguments)
"""`gpulocker run` as a real user, in child processes, against the agent's real socket:
CMD's exit status, signal forwarding, release on exit, waiting in line."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import select

from gpulocker import allocations, scheduler
from gpulocker.agent import localapi
from gpulocker.context import Context
from gpulocker.models import ACTIVE, Allocation, Gpu
from tests.cli.test_cli import database_url, run_as, server, socket_path  # noqa: F401
from tests.conftest import needs_root
from tests.helpers import ALICE, CAROL, TestUser

pytestmark = needs_root


def _active(ctx: Context, user: str) -> list[Allocation]:
    with ctx.db.session() as s:
        stmt = select(Allocation).where(Allocation.user == user, Allocation.state == ACTIVE)
        return list(s.scalars(stmt))


def _spawn(user: TestUser, socket: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "gpulocker", "run", *args],
        user=user.uid,
        group=user.gid,
        extra_groups=[],
        cwd="/",
        env={
            "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
            "HOME": user.home,
            "GPULOCKER_SOCKET": str(socket),
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_run_sets_the_variables_exits_with_the_status_and_releases(
    server: localapi.Server,
    socket_path: Path,
    users: dict[str, TestUser],
    ctx: Context,
) -> None:
    env = {"GPULOCKER_SOCKET": str(socket_path)}
    result = run_as(
        users[ALICE],
        "run",
        "-t",
        "a100",
        "-n",
        "2",
        "--",
        "sh",
        "-c",
        'echo "$CUDA_VISIBLE_DEVICES $CUDA_DEVICE_ORDER"; exit 7',
        env=env,
    )
    assert result.returncode == 7, result.stderr
    with ctx.db.session() as session:
        gpus = session.scalars(select(Gpu).where(Gpu.gpu_id.in_([4, 5])).order_by(Gpu.gpu_id))
        uuids = ",".join(g.uuid or str(g.gpu_id) for g in gpus)
    assert result.stdout == f"{uuids} PCI_BUS_ID\n"
    assert "released allocation(s)" in result.stderr
    assert _active(ctx, ALICE) == []


def test_run_forwards_signals_and_releases(
    server: localapi.Server,
    socket_path: Path,
    users: dict[str, TestUser],
    ctx: Context,
) -> None:
    code = (
        "import os, signal, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: (os.write(1, b'got TERM\\n'), os._exit(3)))\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = _spawn(users[ALICE], socket_path, "-t", "4090", "--", sys.executable, "-c", code)
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n"
    assert len(_active(ctx, ALICE)) == 1
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 3, err
    assert out == "got TERM\n"
    assert _active(ctx, ALICE) == []


def test_run_waits_in_line_showing_its_position(
    server: localapi.Server,
    socket_path: Path,
    users: dict[str, TestUser],
    ctx: Context,
) -> None:
    held = allocations.request(ctx.db, ctx.settings, CAROL, "a100", 2, 1)
    proc = _spawn(
        users[ALICE],
        socket_path,
        "-t",
        "a100",
        "--wait",
        "--",
        "sh",
        "-c",
        'echo "[$CUDA_VISIBLE_DEVICES]"',
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not scheduler.queue.list_for(ctx.db, ctx.settings, ALICE):
        time.sleep(0.1)
    allocations.release(ctx.db, ctx.settings, CAROL, held[1].id)
    while proc.poll() is None and time.monotonic() < deadline:
        scheduler.run_pass(ctx.db, ctx.settings)
        time.sleep(0.2)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert "position 1 in the line" in err
    with ctx.db.session() as session:
        gpu = session.scalars(select(Gpu).where(Gpu.gpu_id == 5)).one()
    assert out == f"[{gpu.uuid or 5}]\n"
    assert _active(ctx, ALICE) == []
