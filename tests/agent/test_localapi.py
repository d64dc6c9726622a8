"""The agent's local socket: real Unix socket, real users, identity from SO_PEERCRED.

Clients run as ALICE, BOB and ADMIN in child processes (setuid), so the kernel, not the
client, says who is calling.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy import func, select

from gpulocker import allocations, heartbeat
from gpulocker.agent import localapi
from gpulocker.config import Settings
from gpulocker.context import Context
from gpulocker.models import ACTIVE, RELEASED, Allocation, Event, utcnow
from gpulocker.operations import OPERATIONS
from gpulocker.operations.allocating import wait_for_access
from tests.helpers import ADMIN, ALICE, BOB, CAROL, EACCES, TestUser, cuda, try_open_as, wait_for

# A client that sends one request line and prints the answer line: runs as any user.
CLIENT = (
    "import json, socket, sys\n"
    "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
    "s.connect(sys.argv[1])\n"
    "s.sendall(sys.argv[2].encode() + b'\\n')\n"
    "print(s.makefile('rb').readline().decode(), end='')\n"
)


@pytest.fixture
def socket_path(device_dir: Path) -> Path:
    """A short path (AF_UNIX paths are limited to 107 bytes) in a 0755 directory."""
    return device_dir.parent / "run" / "gl.sock"


@pytest.fixture
def server(ctx: Context, socket_path: Path) -> Iterator[localapi.Server]:
    """The local socket served for the test's database."""
    srv = localapi.start(ctx, socket_path)
    yield srv
    srv.close()


def call_as(
    caller: TestUser | None, path: Path, op: str, as_uid: int | None = None, **args: Any
) -> dict[str, Any]:
    """Send one request from a process running as `caller` (or a bare uid)."""
    request = json.dumps({"op": op, "args": args})
    return raw_as(caller, path, request, as_uid)


def raw_as(user: TestUser | None, path: Path, line: str, uid: int | None = None) -> dict[str, Any]:
    """Send one raw request line as `user`; the decoded answer."""
    run_uid = user.uid if user else uid
    run_gid = user.gid if user else uid
    proc = subprocess.run(
        [sys.executable, "-c", CLIENT, str(path), line],
        user=run_uid,
        group=run_gid,
        extra_groups=[],
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return dict(json.loads(proc.stdout))


def active_count(ctx: Context) -> int:
    with ctx.db.session() as s:
        stmt = select(func.count()).select_from(Allocation).where(Allocation.state == ACTIVE)
        return s.scalar(stmt) or 0


def test_it_serves_a_socket_everyone_can_reach(server: localapi.Server, socket_path: Path) -> None:
    mode = socket_path.stat().st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o666
    assert stat.S_IMODE(socket_path.parent.stat().st_mode) == 0o755


def test_it_knows_the_caller_from_peer_credentials(
    server: localapi.Server, socket_path: Path, users: dict[str, TestUser]
) -> None:
    assert call_as(users[ALICE], socket_path, "me")["result"]["username"] == ALICE
    bob = call_as(users[BOB], socket_path, "me")["result"]
    assert {k: bob[k] for k in ("username", "is_admin", "locked_until")} == {
        "username": BOB,
        "is_admin": False,
        "locked_until": None,
    }
    assert bob["usage"] == {"gpus": 0, "gpu_hours_week": 0} and bob["fairshare_usage"] == 0
    assert call_as(users[ADMIN], socket_path, "me")["result"]["is_admin"] is True


def test_it_grants_to_the_caller_and_nobody_else(
    server: localapi.Server, socket_path: Path, users: dict[str, TestUser], ctx: Context
) -> None:
    answer = call_as(
        users[ALICE], socket_path, "allocations.request", gpu_type="4090", count=2, hours=1.5
    )["result"]
    assert [a["user"] for a in answer["allocations"]] == [ALICE, ALICE]
    assert answer["cuda_visible_devices"] == cuda(0, 1)
    assert answer["access"] == "pending"  # no agent runs in this test
    assert answer["agent"] == "not running"
    with ctx.db.session() as s:
        rows = s.scalars(select(Allocation).where(Allocation.state == ACTIVE)).all()
    assert {(r.user, r.gpu_id) for r in rows} == {(ALICE, 0), (ALICE, 1)}
    bobs = call_as(users[BOB], socket_path, "allocations.list_for")["result"]
    assert bobs == {"allocations": []}


def test_it_does_not_let_bob_release_alices_gpu(
    server: localapi.Server, socket_path: Path, users: dict[str, TestUser], ctx: Context
) -> None:
    (row,) = allocations.request(ctx.db, ctx.settings, ALICE, "a100", 1, 1)
    answer = call_as(users[BOB], socket_path, "allocations.release", id=row.id)
    assert answer == {"error": {"code": "not_found", "message": f"no allocation {row.id}"}}
    answer = call_as(users[BOB], socket_path, "allocations.extend", id=row.id, hours=1)
    assert answer["error"]["code"] == "not_found"
    assert call_as(users[BOB], socket_path, "allocations.release_all", user=ALICE)["error"] == {
        "code": "forbidden",
        "message": "only admins can release another user's GPUs",
    }
    with ctx.db.session() as s:
        assert s.get(Allocation, row.id).state == ACTIVE  # type: ignore[union-attr]


def test_it_lets_an_admin_release_anyones_gpu(
    server: localapi.Server, socket_path: Path, users: dict[str, TestUser], ctx: Context
) -> None:
    (row,) = allocations.request(ctx.db, ctx.settings, ALICE, "a100", 1, 1)
    answer = call_as(users[ADMIN], socket_path, "allocations.release", id=row.id)["result"]
    assert answer["allocation"]["state"] == RELEASED
    with ctx.db.session() as s:
        stored = s.get(Allocation, row.id)
        assert stored is not None and stored.released_by == ADMIN and stored.state == RELEASED


def test_it_keeps_admin_operations_for_admins(
    server: localapi.Server, socket_path: Path, users: dict[str, TestUser], ctx: Context
) -> None:
    allocations.request(ctx.db, ctx.settings, ALICE, "4090", 1, 1)
    bob = users[BOB]
    for op, args in [
        ("allocations.reset", {}),
        ("maintenance.set_enabled", {"enabled": True}),
        ("lockouts.all_active", {}),
        ("lockouts.lift", {"user": ALICE}),
        ("notify.admin_message", {"user": ALICE, "message": "hi"}),
        ("allocations.request", {"gpu_type": "4090", "count": 1, "hours": 1, "user": CAROL}),
    ]:
        assert call_as(bob, socket_path, op, **args)["error"]["code"] == "forbidden", op
    assert active_count(ctx) == 1
    admin = users[ADMIN]
    granted = call_as(
        admin, socket_path, "allocations.request", gpu_type="a100", count=1, hours=1, user=BOB
    )["result"]["allocations"]
    assert granted[0]["user"] == BOB
    assert call_as(admin, socket_path, "maintenance.set_enabled", enabled=True)["result"] == {
        "enabled": True,
        "message": "",
    }
    refused = call_as(bob, socket_path, "allocations.request", gpu_type="4090", count=1, hours=1)
    assert refused["error"]["code"] == "maintenance"
    assert call_as(admin, socket_path, "allocations.reset")["result"] == {"count": 2}
    assert active_count(ctx) == 0


def test_it_refuses_bad_input_clearly_and_loses_nothing(
    server: localapi.Server, socket_path: Path, users: dict[str, TestUser], ctx: Context
) -> None:
    (row,) = allocations.request(ctx.db, ctx.settings, ALICE, "4090", 1, 1)
    alice = users[ALICE]
    cases = {
        "not json": "a request must be one line of JSON",
        "[1, 2]": 'a request is a JSON object: {"op": "...", "args": {...}}',
        '{"op": "allocations.drop_table"}': "unknown operation 'allocations.drop_table'",
        '{"op": "allocations.release", "args": []}': "args must be a JSON object",
        '{"op": "allocations.release", "args": {}}': "id: Field required",
        '{"op": "allocations.release", "args": {"id": "1"}}': "id: Input should be a valid integer",
        '{"op": "allocations.extend", "args": {"id": 1, "hours": true}}': "hours: Input should be a valid number",
        '{"op": "allocations.release", "args": {"id": 1, "force": true}}': "force: Extra inputs are not permitted",
        '{"op": "allocations.request", "args": {"gpu_type": "4090", "count": 1, "hours": -1}}': (
            "hours: Input should be greater than 0"
        ),
        '{"op": "allocations.request", "args": {"gpu_type": "h100", "count": 1, "hours": 1}}': (
            "unknown GPU type 'h100'"
        ),
        '{"op": "allocations.extend", "args": {"id": 1, "hours": 1e9}}': "hours must be at most",
        '{"op": "lockouts.lift", "args": {"user": "a\\u0000b"}}': "user: must not contain NUL",
        json.dumps({"op": "lockouts.lift", "args": {"user": "u" * 256}}): (
            "user: String should have at most 32 characters"
        ),
        '{"op": "allocations.request", "args": {"gpu_type": "4090", "hours": NaN, "count": 1}}': (
            "hours: Input should be a finite number"
        ),
    }
    huge = '{"op": "allocations.get", "args": {"id": 99999999999999999999}}'
    assert raw_as(alice, socket_path, huge)["error"]["code"] == "not_found"  # as over HTTP
    for line, message in cases.items():
        answer = raw_as(alice, socket_path, line)
        assert set(answer) == {"error"}, line
        assert answer["error"]["code"] == "invalid", line
        assert answer["error"]["message"].startswith(message), (line, answer)
    with ctx.db.session() as s:
        stored = s.get(Allocation, row.id)
        assert stored is not None and stored.state == ACTIVE
        assert stored.expires_at == row.expires_at
        kinds = s.scalars(select(Event.kind)).all()
    assert kinds == ["gpu_added"] * 6 + ["granted"]


def test_it_answers_many_requests_on_one_connection_and_refuses_huge_lines(
    server: localapi.Server, socket_path: Path
) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(socket_path))
        reader = sock.makefile("rb")
        for _ in range(3):
            sock.sendall(b'{"op": "me"}\n')
            assert json.loads(reader.readline())["result"]["username"] == "root"
        sock.sendall(b"x" * (localapi.MAX_LINE + 10) + b"\n")
        answer = json.loads(reader.readline())
        assert answer["error"]["message"].startswith("a request must be under")
        assert reader.readline() == b""  # and the connection is closed


def test_it_refuses_a_uid_without_a_user_name(
    server: localapi.Server, socket_path: Path, users: dict[str, TestUser]
) -> None:
    answer = call_as(None, socket_path, "allocations.list_for", as_uid=64999)
    assert answer == {
        "error": {"code": "forbidden", "message": "your uid has no user name on this host"}
    }


def test_it_reports_the_status_of_every_gpu(
    server: localapi.Server, socket_path: Path, users: dict[str, TestUser], ctx: Context
) -> None:
    allocations.request(ctx.db, ctx.settings, ALICE, "a100", 1, 2)
    status = call_as(users[BOB], socket_path, "status")["result"]
    gpus = {g["gpu_id"]: g for g in status["gpus"]}
    assert sorted(gpus) == [0, 1, 2, 3, 4, 5]
    assert gpus[4]["holder"] == ALICE and gpus[4]["gpu_type"] == "a100"
    assert gpus[0]["holder"] is None and gpus[0]["memory_total_mib"] == 24564
    assert status["maintenance"] is False


def test_it_replaces_a_stale_socket_and_refuses_a_live_one(ctx: Context, socket_path: Path) -> None:
    socket_path.parent.mkdir(mode=0o755)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(socket_path))
    stale.close()  # the file stays, nobody listens: what a crash leaves behind
    first = localapi.start(ctx, socket_path)
    try:
        with pytest.raises(OSError, match="already serves"):
            localapi.start(ctx, socket_path)
        other = Context(ctx.settings.with_overrides(socket_path=socket_path))
        assert localapi.start_quietly(other) is None  # logged; the agent would go on
        other.close()
    finally:
        first.close()
    assert not socket_path.exists()


def test_it_refuses_to_replace_a_file_that_is_not_a_socket(ctx: Context, socket_path: Path) -> None:
    socket_path.parent.mkdir(mode=0o755)
    socket_path.write_text("precious")
    with pytest.raises(OSError, match="not a socket"):
        localapi.start(ctx, socket_path)
    assert socket_path.read_text() == "precious"


def test_it_waits_for_a_live_agent_to_apply_access(ctx: Context, settings: Settings) -> None:
    with ctx.db.transaction() as s:
        heartbeat.beat(s, heartbeat.agent_name(settings.gpu_host))
    (row,) = allocations.request(ctx.db, settings, ALICE, "4090", 1, 1)
    with ctx.db.transaction() as s:
        allocations.mark_access_applied(s, row.id, utcnow())
    answer = wait_for_access(ctx, [row.id], timeout=1)
    assert answer[0].access_applied_at is not None


def test_close_ends_open_connections(ctx: Context, socket_path: Path) -> None:
    srv = localapi.start(ctx, socket_path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(socket_path))
        sock.sendall(b'{"op": "me"}\n')
        reader = sock.makefile("rb")
        assert json.loads(reader.readline())["result"]["username"] == "root"
        srv.close()
        assert reader.readline() == b""
    assert not os.path.exists(socket_path)


def test_the_agent_serves_the_socket_and_a_grant_waits_for_access(
    ctx: Context, settings: Settings, users: dict[str, TestUser]
) -> None:
    from gpulocker.agent.loop import start_in_thread

    path = settings.local_socket_path
    _agent, stop, thread = start_in_thread(ctx)
    try:
        wait_for(path.is_socket, timeout=10)
        with ctx.db.session() as s:  # served only once the agent beat and reconciled
            assert heartbeat.age_seconds(s, heartbeat.agent_name(settings.gpu_host)) is not None
        answer = call_as(
            users[ALICE], path, "allocations.request", gpu_type="4090", count=1, hours=1
        )["result"]
        assert answer["access"] == "applied"
        device = answer["allocations"][0]["device"]
        assert try_open_as(users[ALICE], device) == 0
        assert try_open_as(users[BOB], device) == EACCES
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not path.exists()  # the socket goes with the agent


def test_the_socket_is_served_only_once_the_agent_enforces(
    ctx: Context, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request over the socket waits for the agent to apply access, which means nothing
    before the agent's first reconcile and heartbeat: the socket appears after them."""
    from gpulocker.agent.loop import Agent, start_in_thread

    started = threading.Event()
    first = Agent.start

    def slow_start(agent: Agent) -> bool:
        started.set()
        time.sleep(1.0)  # a first reconcile on a loaded host
        return first(agent)

    monkeypatch.setattr(Agent, "start", slow_start)
    path = settings.local_socket_path
    agent, stop, thread = start_in_thread(ctx)
    try:
        wait_for(started.is_set, timeout=10)
        time.sleep(0.5)
        assert not path.exists()  # still starting
        wait_for(path.is_socket, timeout=10)
        assert agent.reconciled_at is not None
        with ctx.db.session() as s:
            assert heartbeat.age_seconds(s, heartbeat.agent_name(settings.gpu_host)) is not None
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not path.exists()


def test_one_user_cannot_take_every_connection(
    server: localapi.Server, socket_path: Path, users: dict[str, TestUser]
) -> None:
    def open_one(ask: bool = True) -> tuple[socket.socket, Any]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(socket_path))
        if ask:
            sock.sendall(b'{"op": "me"}\n')
        return sock, sock.makefile("rb")

    held = [open_one() for _ in range(server.admission.per_person)]
    try:
        assert all(json.loads(r.readline())["result"]["username"] == "root" for _, r in held)
        extra, reader = open_one(ask=False)  # refused at once, before it could ask
        assert json.loads(reader.readline())["error"] == {
            "code": "busy",
            "message": f"you have {server.admission.per_person} connections open already",
        }
        extra.close()
        assert call_as(users[BOB], socket_path, "me")["result"]["username"] == BOB
    finally:
        for sock, reader in held:
            reader.close()
            sock.close()
    wait_for(lambda: call_as(None, socket_path, "me", as_uid=0).get("result"), timeout=5)


WRONG_VALUES: list[Any] = ["x", "", "a" * 5000, 7, -1, 2**40, 2.5, True, [], {}, [1, "2"], None]
GOOD_ARGS: dict[str, dict[str, Any]] = {
    "allocations.request": {"gpu_type": "4090", "count": 1, "hours": 1},
    "allocations.get": {"id": 1},
    "allocations.extend": {"id": 1, "hours": 1},
    "allocations.release": {"id": 1},
    "lockouts.lift": {"user": "x"},
    "maintenance.set_enabled": {"enabled": True},
    "notify.admin_message": {"user": "x", "message": "m"},
    "requests.submit": {"gpu_type": "4090", "count": 1, "hours": 1},
    "requests.get": {"id": 1},
    "requests.cancel": {"id": 1},
    "reservations.book": {
        "gpu_type": "4090",
        "count": 1,
        "start": "2031-01-01T00:00:00+00:00",
        "hours": 1,
    },
    "reservations.get": {"id": 1},
    "reservations.cancel": {"id": 1},
}


def test_every_argument_of_every_operation_is_checked(ctx: Context) -> None:
    (row,) = allocations.request(ctx.db, ctx.settings, ALICE, "4090", 1, 1)
    with ctx.db.session() as s:
        events_before = s.scalar(select(func.count()).select_from(Event))
    checked = 0
    for op, spec in OPERATIONS.items():
        good = GOOD_ARGS.get(op, {})
        for name in spec.args.model_fields:
            for value in WRONG_VALUES:
                args = good | {name: value}
                try:
                    spec.args.model_validate(args)
                    continue  # an accepted value, not a wrong one
                except ValidationError:
                    pass
                answer = localapi.handle(ctx, ADMIN, {"op": op, "args": args})
                assert answer.get("error", {}).get("code") == "invalid", (op, name, value, answer)
                assert answer["error"]["message"].startswith(name), answer
                checked += 1
        answer = localapi.handle(ctx, ADMIN, {"op": op, "args": good | {"bogus": 1}})
        assert answer["error"]["code"] == "invalid", (op, answer)
    assert checked > 60
    with ctx.db.session() as s:
        assert s.scalar(select(func.count()).select_from(Event)) == events_before
        stored = s.get(Allocation, row.id)
        assert stored is not None and stored.state == ACTIVE


def test_no_well_typed_request_is_an_internal_error(ctx: Context) -> None:
    allocations.request(ctx.db, ctx.settings, ALICE, "4090", 1, 1)
    for actor in (ALICE, ADMIN):
        for op in OPERATIONS:
            args = GOOD_ARGS.get(op, {})
            answer = localapi.handle(ctx, actor, {"op": op, "args": args})
            assert "result" in answer or answer["error"]["code"] not in (
                "internal",
                "unavailable",
            ), (
                actor,
                op,
                answer,
            )
