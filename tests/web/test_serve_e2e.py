"""End to end: the README's command starts the product; a real user signs in over HTTP,
takes two GPUs, sees them in /api/gpu_status, and releases them."""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.helpers import ADMIN, ALICE, BOB, TestUser, wait_for


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def server(tmp_path: Path, pam_service: str, users: dict[str, TestUser]) -> Iterator[str]:
    """`python -m gpulocker serve --simulate '{"4090": 4}' --port P`, as a real process."""
    port = free_port()
    state = tmp_path / "state"
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "STATE_DIR": str(state),
        "SOCKET_PATH": str(tmp_path / "gl.sock"),
        "PAM_SERVICE": pam_service,
        "PRIVILEGED_USERS": ADMIN,
        "HOST": "127.0.0.1",
    }
    command = [
        sys.executable,
        "-m",
        "gpulocker",
        "serve",
        "--simulate",
        '{"4090": 4}',
        "--port",
        str(port),
    ]
    log = (tmp_path / "serve.log").open("w+")
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _healthy(url), timeout=30, interval=0.2)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        log.seek(0)
        output = log.read()
        log.close()
        print(output)
    assert proc.returncode == 0, output
    assert f"http://127.0.0.1:{port}/" in output and "Linux account" in output
    assert not re.search(r"gpulocker agent\b", _processes_of(tmp_path)), "agent left behind"


def _healthy(url: str) -> bool:
    try:
        return requests.get(f"{url}/healthz", timeout=2).json()["status"] == "ok"
    except (requests.RequestException, ValueError, KeyError):
        return False


def _processes_of(tmp_path: Path) -> str:
    """Command lines of live processes whose environment names this test's state dir."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if str(tmp_path).encode() in (proc / "environ").read_bytes():
                found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:
            continue
    return "\n".join(found)


def test_a_user_signs_in_takes_two_gpus_and_releases_them(
    server: str, users: dict[str, TestUser], tmp_path: Path
) -> None:
    web = requests.Session()
    signed_in = web.post(
        f"{server}/api/v1/tokens",
        json={"username": ALICE, "password": users[ALICE].password},
        timeout=10,
    )
    assert signed_in.status_code == 201, signed_in.text
    web.headers["Authorization"] = f"Bearer {signed_in.json()['token']}"

    taken = web.post(
        f"{server}/api/v1/allocations",
        json={"gpu_type": "4090", "count": 2, "hours": 1},
        timeout=10,
    )
    assert taken.status_code == 201, taken.text
    body = taken.json()
    assert (body["access"], body["agent"]) == ("applied", "running")
    held = {a["gpu_id"]: a for a in body["allocations"]}
    assert len(held) == 2

    status = web.get(f"{server}/api/gpu_status", timeout=10).json()["gpus"]
    mine = [g for g in status if g["holder"] == ALICE]
    assert sorted(g["gpu_id"] for g in mine) == sorted(held)
    assert all(g["expires_at"] for g in mine) and len(status) == 4

    device = Path(body["allocations"][0]["device"])
    assert stat.S_IMODE(device.stat().st_mode) & 0o007 == 0  # closed to others
    acl = subprocess.run(["getfacl", "-p", str(device)], capture_output=True, text=True).stdout
    assert f"user:{ALICE}:rw-" in acl and f"user:{BOB}" not in acl

    for allocation_id in held.values():
        released = web.delete(f"{server}/api/v1/allocations/{allocation_id['id']}", timeout=10)
        assert released.json()["allocation"]["state"] == "released"
    after = web.get(f"{server}/api/gpu_status", timeout=10).json()["gpus"]
    assert all(g["holder"] is None for g in after)
    wait_for(
        lambda: (
            f"user:{ALICE}"
            not in subprocess.run(
                ["getfacl", "-p", str(device)], capture_output=True, text=True
            ).stdout
        ),
        timeout=5,
    )


def agent_pids(tmp_path: Path) -> set[int]:
    """Pids of this test's agent processes."""
    pids = set()
    for proc in Path("/proc").iterdir():
        try:
            if (
                proc.name.isdigit()
                and str(tmp_path).encode() in (proc / "environ").read_bytes()
                and b"\0agent" in (proc / "cmdline").read_bytes()
            ):
                pids.add(int(proc.name))
        except OSError:
            continue
    return pids


def test_serve_restarts_a_dead_agent(server: str, tmp_path: Path) -> None:
    (first,) = wait_for(lambda: agent_pids(tmp_path), timeout=10)  # type: ignore[misc]
    os.kill(first, signal.SIGKILL)
    restarted = wait_for(lambda: agent_pids(tmp_path) - {first}, timeout=15)
    assert len(restarted) == 1  # type: ignore[arg-type]
    wait_for(lambda: _healthy(server), timeout=15, interval=0.2)
