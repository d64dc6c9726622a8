"""Deep or huge JSON is a clear 4xx on the web and an error answer on the socket, which
then keeps serving: never a 500, never a dead connection thread (SPEC §12)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpulocker.agent import localapi
from gpulocker.context import Context
from gpulocker.web import create_app
from tests.helpers import ALICE, TestUser

DEEP_LIST = "[" * 100_000 + "]" * 100_000
DEEP_OBJECT = '{"username": ' + '{"a": ' * 900 + "1" + "}" * 900 + ', "password": "x"}'
HUGE_NUMBER = '{"username": "alice", "password": "x", "n": ' + "9" * 5000 + "}"

# One connection, as a student's script would hold it: the hostile line, then a fair one.
CLIENT = (
    "import socket, sys\n"
    "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
    "s.connect(sys.argv[1])\n"
    "answers = s.makefile('rb')\n"
    "s.sendall(sys.stdin.buffer.read() + b'\\n')\n"
    "print(answers.readline().decode(), end='')\n"
    's.sendall(b\'{"op": "me", "args": {}}\\n\')\n'
    "print(answers.readline().decode(), end='')\n"
)


@pytest.mark.parametrize("body", [DEEP_LIST, DEEP_OBJECT, HUGE_NUMBER], ids=["list", "obj", "num"])
def test_the_anonymous_token_endpoint_refuses_deep_json_with_a_4xx(ctx: Context, body: str) -> None:
    client = create_app(ctx=ctx).test_client()
    answer = client.post("/api/v1/tokens", data=body, headers={"Content-Type": "application/json"})
    assert 400 <= answer.status_code < 500
    assert answer.get_json()["error"]["code"] == "invalid"


@pytest.fixture
def server(ctx: Context, device_dir: Path) -> Iterator[Path]:
    path = device_dir.parent / "run" / "gl.sock"
    srv = localapi.start(ctx, path)
    yield path
    srv.close()


@pytest.mark.parametrize(
    "line", [DEEP_LIST[:60_000], '{"op": "me", "args": ' + '{"a": ' * 900 + "1" + "}" * 901]
)
def test_the_socket_answers_deep_json_and_keeps_serving(
    server: Path, users: dict[str, TestUser], line: str
) -> None:
    alice = users[ALICE]
    done = subprocess.run(
        [sys.executable, "-c", CLIENT, str(server)],
        input=line.encode(),
        user=alice.uid,
        group=alice.gid,
        extra_groups=[],
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        check=True,
        timeout=30,
    )
    first, second = (json.loads(part) for part in done.stdout.decode().splitlines())
    assert first["error"]["code"] == "invalid"
    assert second["result"]["username"] == ALICE  # the same connection still serves
