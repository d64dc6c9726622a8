"""The socket's limits are per person: subuids count as their owner, uids without an
account share a small allowance, silence frees a slot fast, and a flood of requests is
slowed down without anyone else noticing (SPEC §12). Done with real processes as real
(sub)uids against the real server."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpulocker.agent import localapi
from gpulocker.agent.admission import Admission
from gpulocker.context import Context
from tests.agent.test_localapi import call_as
from tests.helpers import ALICE, CAROL, TestUser

SUB_START = 420_000  # alice's subordinate uids in the test's /etc/subuid

# Connects as whatever uid it runs as, says whether it was let in, then holds on.
HOLDER = (
    "import socket, sys\n"
    "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
    "s.connect(sys.argv[1])\n"
    "s.settimeout(1.0)\n"
    "try:\n"
    "    said = s.recv(4096)\n"
    "except socket.timeout:\n"
    "    said = b'held'\n"
    "print(said.decode().strip(), flush=True)\n"
    "sys.stdin.read()\n"
)


@pytest.fixture
def server(ctx: Context, device_dir: Path, users: dict[str, TestUser]) -> Iterator[localapi.Server]:
    subuid = device_dir.parent / "subuid"
    subuid.write_text(f"{ALICE}:{SUB_START}:65536\n")
    srv = localapi.start(ctx, device_dir.parent / "run" / "gl.sock")
    srv.admission = Admission(subuid=subuid)
    yield srv
    srv.close()


def _start_holder(uid: int, path: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)],
        user=uid,
        group=uid,
        extra_groups=[],
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def _said(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    return proc.stdout.readline().strip()


def _hold_all(uids: list[int], path: Path, held: list[subprocess.Popen[str]]) -> list[str]:
    """Connect as each uid at once (each holder waits a second for an answer), then read
    what each was told: in parallel, so the test waits one second, not one per holder."""
    procs = [_start_holder(uid, path) for uid in uids]
    held.extend(procs)
    return [_said(proc) for proc in procs]


def test_subuids_count_as_their_owner(server: localapi.Server, users: dict[str, TestUser]) -> None:
    server.first_request_timeout = 60  # they hold their slots without asking anything
    held = []
    try:
        uids = [SUB_START + n for n in range(server.admission.per_person)]
        assert _hold_all(uids, server.path, held) == ["held"] * len(uids)
        (said,) = _hold_all([SUB_START + 500], server.path, held)
        assert json.loads(said)["error"]["code"] == "busy"
        assert call_as(users[CAROL], server.path, "me")["result"]["username"] == CAROL
    finally:
        for proc in held:
            proc.kill()
            proc.wait()


def test_uids_without_an_account_share_a_small_allowance(
    server: localapi.Server, users: dict[str, TestUser]
) -> None:
    server.first_request_timeout = 60
    held = []
    try:
        uids = [610_000 + n * 7 for n in range(server.admission.strangers)]
        assert _hold_all(uids, server.path, held) == ["held"] * len(uids)
        (said,) = _hold_all([610_000 + 500 * 7], server.path, held)
        assert json.loads(said)["error"]["code"] == "busy"
        assert call_as(users[CAROL], server.path, "me")["result"]["username"] == CAROL
    finally:
        for proc in held:
            proc.kill()
            proc.wait()


def test_a_silent_connection_loses_its_slot_soon(server: localapi.Server) -> None:
    server.first_request_timeout = 0.5
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(server.path))
    sock.settimeout(10)
    started = time.monotonic()
    assert sock.recv(1) == b""  # the server hung up
    assert time.monotonic() - started < 5
    sock.close()


def test_a_flood_of_requests_is_slowed_down_for_that_person_only(
    server: localapi.Server, users: dict[str, TestUser]
) -> None:
    flood = 200
    script = (
        "import json, socket, sys\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
        "s.connect(sys.argv[1])\n"
        f's.sendall(b\'{{"op": "me"}}\\n\' * {flood})\n'
        "r = s.makefile('rb')\n"
        f"codes = [json.loads(r.readline()).get('error', {{}}).get('code') for _ in range({flood})]\n"
        "print(json.dumps(codes))\n"
    )
    alice = users[ALICE]
    done = subprocess.run(
        [sys.executable, "-c", script, str(server.path)],
        user=alice.uid,
        group=alice.gid,
        extra_groups=[],
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    codes = json.loads(done.stdout)
    assert codes.count(None) >= server.admission.burst - 1  # the burst is served
    assert codes.count("throttled") > 0  # the rest is told to slow down
    assert call_as(users[CAROL], server.path, "me")["result"]["username"] == CAROL
