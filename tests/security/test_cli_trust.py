"""The CLI trusts only its own socket: a classmate's fake agent, named in a `.env` of a
shared project folder or given by path, gets no request and makes `eval` run nothing
(SPEC §12). Done as the attacker would: bob runs a real fake agent, alice the real command."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import ALICE, BOB, TestUser

FAKE_AGENT = r"""
import json, os, socket, sys
path, log = sys.argv[1], sys.argv[2]
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(path)
os.chmod(path, 0o777)
server.listen(8)
print("ready", flush=True)
while True:
    conn, _ = server.accept()
    line = conn.makefile("rb").readline()
    with open(log, "ab") as out:
        out.write(line)
    marker = sys.argv[3]
    answer = {"result": {
        "allocations": [{"id": 1, "gpu_id": 0, "gpu_type": "4090", "host": "h", "user": "x",
                         "expires_at": "2031-01-01T00:00:00+00:00", "state": "active"}],
        "cuda_visible_devices": f"0$(touch {marker})", "access": "applied", "agent": "running"}}
    conn.sendall(json.dumps(answer).encode() + b"\n")
    conn.close()
"""


@pytest.fixture
def shared_folder() -> Iterator[Path]:
    """A project folder everyone in the group may write to (mode 1777, like /tmp)."""
    folder = Path(tempfile.mkdtemp(prefix="glt-shared-", dir="/tmp"))
    folder.chmod(0o1777)
    yield folder
    subprocess.run(["rm", "-rf", str(folder)], check=False)


@pytest.fixture
def fake_agent(
    shared_folder: Path, users: dict[str, TestUser]
) -> Iterator[tuple[Path, Path, Path]]:
    """Bob's fake agent listening in the shared folder; (socket, request log, marker)."""
    bob = users[BOB]
    sock, log, marker = (
        shared_folder / "agent.sock",
        shared_folder / "seen",
        shared_folder / "pwned",
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", FAKE_AGENT, str(sock), str(log), str(marker)],
        user=bob.uid,
        group=bob.gid,
        extra_groups=[],
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    (shared_folder / ".env").write_text(f"SOCKET_PATH={sock}\nGPULOCKER_SOCKET={sock}\n")
    os.chown(shared_folder / ".env", bob.uid, bob.gid)
    yield sock, log, marker
    proc.kill()
    proc.wait()


def _as_alice(alice: TestUser, cwd: Path, shell: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", shell],
        user=alice.uid,
        group=alice.gid,
        extra_groups=[],
        cwd=cwd,
        env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": alice.home},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_dotenv_in_a_shared_folder_does_not_choose_the_agent(
    shared_folder: Path, fake_agent: tuple[Path, Path, Path], users: dict[str, TestUser]
) -> None:
    _sock, seen, marker = fake_agent
    done = _as_alice(
        users[ALICE], shared_folder, 'eval "$(python -m gpulocker request -t 4090 -n 1 --hours 1)"'
    )
    time.sleep(0.2)
    assert not marker.exists()
    assert not seen.exists()  # the fake agent never heard from alice
    assert "gpulocker:" in done.stderr


def test_a_socket_served_by_someone_else_gets_no_request(
    shared_folder: Path, fake_agent: tuple[Path, Path, Path], users: dict[str, TestUser]
) -> None:
    sock, seen, marker = fake_agent
    done = _as_alice(
        users[ALICE],
        Path("/"),
        f'eval "$(python -m gpulocker request -t 4090 -n 1 --hours 1 --socket {sock})"',
    )
    time.sleep(0.2)
    assert not marker.exists()
    assert not seen.exists() or seen.read_bytes() == b""  # connected, then nothing sent
    assert "neither root nor you" in done.stderr
