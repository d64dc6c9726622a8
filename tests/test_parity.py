"""The local socket and the HTTP API are two doors to the same operations.

For every operation the socket serves, the same call through both (a real agent socket
on a temp path, asked by a process of the real user; the Flask app asked with that user's
token, along the CLI's own route table) answers with the same keys, and the same bad
input is refused with the same error code on both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from gpulocker import allocations, heartbeat, lockouts, queue, reservations
from gpulocker import schemas as s
from gpulocker.agent import localapi
from gpulocker.cli.client import ROUTES, http_request_for
from gpulocker.context import Context
from gpulocker.models import utcnow
from gpulocker.operations import OPERATIONS
from tests.agent.test_localapi import call_as
from tests.helpers import ADMIN, ALICE, BOB, TestUser
from tests.web.api_fixtures import Headers, app, bearer, client

__all__ = ["app", "bearer", "client"]

Args = dict[str, Any]
NEW = "<a fresh allocation of alice's>"
NEW_REQUEST = "<a fresh waiting request of alice's>"
NEW_BOOKING = "<a fresh booking of alice's>"
SOON = (utcnow() + timedelta(days=2)).isoformat()

# op -> (who calls, good arguments); NEW is replaced by a fresh allocation's id per surface.
GOOD: dict[str, tuple[str, Args]] = {
    "me": (ALICE, {}),
    "status": (ALICE, {}),
    "allocations.request": (ALICE, {"gpu_type": "4090", "count": 1, "hours": 1}),
    "allocations.list_for": (ALICE, {"state": "any"}),
    "allocations.get": (ALICE, {"id": NEW}),
    "allocations.extend": (ALICE, {"id": NEW, "hours": 1}),
    "allocations.release": (ALICE, {"id": NEW}),
    "allocations.release_all": (ALICE, {}),
    "allocations.reset": (ADMIN, {}),
    "lockouts.all_active": (ADMIN, {}),
    "lockouts.lift": (ADMIN, {"user": BOB}),
    "maintenance.set_enabled": (ADMIN, {"enabled": False, "message": "back"}),
    "notify.admin_message": (ADMIN, {"user": BOB, "message": "hello"}),
    "requests.submit": (ALICE, {"gpu_type": "4090", "count": 1, "hours": 1}),
    "requests.list_for": (ALICE, {}),
    "requests.get": (ALICE, {"id": NEW_REQUEST}),
    "requests.cancel": (ALICE, {"id": NEW_REQUEST}),
    "queue.view": (ALICE, {}),
    "reservations.book": (
        ALICE,
        {"gpu_type": "a100", "count": 1, "start": SOON, "hours": 1},
    ),
    "reservations.list_for": (ALICE, {}),
    "reservations.get": (ALICE, {"id": NEW_BOOKING}),
    "reservations.cancel": (ALICE, {"id": NEW_BOOKING}),
    "calendar": (ALICE, {"gpu_type": "a100", "days": 2}),
    "me.usage": (ALICE, {}),
}

HUGE = 2**40
LONG = "x" * 5000

# op -> [(who calls, bad arguments, the code both must answer)]
BAD: dict[str, list[tuple[str, Args, str]]] = {
    "me": [],
    "status": [],
    "allocations.request": [
        (ALICE, {"gpu_type": "4090", "count": HUGE, "hours": 1}, "invalid"),
        (ALICE, {"gpu_type": "4090", "count": -1, "hours": 1}, "invalid"),
        (ALICE, {"gpu_type": "4090", "count": "1", "hours": 1}, "invalid"),
        (ALICE, {"gpu_type": "h100", "count": 1, "hours": 1}, "invalid"),
        (ALICE, {"gpu_type": "4090", "count": 1, "hours": 1e9}, "invalid"),
        (ALICE, {"gpu_type": "4090", "count": 1, "hours": "x"}, "invalid"),
        (ALICE, {"gpu_type": "4090", "gpu_ids": [HUGE], "hours": 1}, "invalid"),
        (ALICE, {"gpu_type": "4090", "gpu_ids": [-1], "hours": 1}, "invalid"),
        (ALICE, {"gpu_type": "4090", "count": 1, "hours": 1, "user": LONG}, "invalid"),
        (ALICE, {"gpu_type": "4090", "count": 1, "hours": 1, "user": BOB}, "forbidden"),
        (ALICE, {"gpu_type": "4090", "count": 9, "hours": 1}, "not_enough_gpus"),
        (ALICE, {"gpu_type": LONG, "count": 1, "hours": 1}, "invalid"),
        (ALICE, {"gpu_type": "4090", "gpu_ids": [0], "hours": 1, "wait": True}, "invalid"),
        (ALICE, {"gpu_type": "4090", "hours": 1, "wait": True, "wait_hours": 1e9}, "invalid"),
        (ALICE, {"gpu_type": "4090", "count": 1, "hours": 1, "wait": 1}, "invalid"),
    ],
    "allocations.list_for": [
        (ALICE, {"state": "bogus"}, "invalid"),
        (ALICE, {"all": "maybe"}, "invalid"),
        (ALICE, {"state": 7}, "invalid"),
    ],
    "allocations.get": [
        (ALICE, {"id": HUGE}, "not_found"),
        (ALICE, {"id": -1}, "not_found"),
        (ALICE, {"id": 999_999}, "not_found"),
        (BOB, {"id": NEW}, "not_found"),
    ],
    "allocations.extend": [
        (ALICE, {"id": HUGE, "hours": 1}, "not_found"),
        (ALICE, {"id": -1, "hours": 1}, "not_found"),
        (ALICE, {"id": NEW, "hours": -1}, "invalid"),
        (ALICE, {"id": NEW, "hours": "x"}, "invalid"),
        (ALICE, {"id": NEW, "hours": 1e9}, "invalid"),
        (ALICE, {"id": NEW, "hours": 1, "force": True}, "invalid"),
    ],
    "allocations.release": [
        (ALICE, {"id": HUGE}, "not_found"),
        (ALICE, {"id": -1}, "not_found"),
        (BOB, {"id": NEW}, "not_found"),
    ],
    "allocations.release_all": [
        (ALICE, {"user": LONG}, "invalid"),
        (ALICE, {"user": 5}, "invalid"),
        (ALICE, {"user": BOB}, "forbidden"),
        (ALICE, {"every": True}, "invalid"),
    ],
    "allocations.reset": [(ALICE, {}, "forbidden")],
    "lockouts.all_active": [(ALICE, {}, "forbidden")],
    "lockouts.lift": [
        (ADMIN, {"user": LONG}, "invalid"),
        (ADMIN, {"user": "a b"}, "invalid"),
        (ALICE, {"user": BOB}, "forbidden"),
    ],
    "requests.submit": [
        (ALICE, {"gpu_type": "4090", "count": -1, "hours": 1}, "invalid"),
        (ALICE, {"gpu_type": "4090", "hours": 1, "wait_hours": 1e9}, "invalid"),
        (ALICE, {"gpu_type": "4090", "hours": 1, "user": BOB}, "forbidden"),
    ],
    "requests.list_for": [(ALICE, {"all": "maybe"}, "invalid")],
    "requests.get": [(ALICE, {"id": 999_999}, "not_found")],
    "requests.cancel": [(ALICE, {"id": 999_999}, "not_found")],
    "queue.view": [],
    "reservations.book": [
        (ALICE, {"gpu_type": "a100", "start": "soon", "hours": 1}, "invalid"),
        (
            ALICE,
            {"gpu_type": "a100", "start": "2026-01-01T00:00Z", "hours": 1, "user": BOB},
            "forbidden",
        ),
    ],
    "reservations.list_for": [(ALICE, {"all": "maybe"}, "invalid")],
    "reservations.get": [(ALICE, {"id": 999_999}, "not_found")],
    "reservations.cancel": [(ALICE, {"id": 999_999}, "not_found")],
    "calendar": [(ALICE, {"days": 99}, "invalid")],
    "me.usage": [],
    "maintenance.set_enabled": [
        (ADMIN, {"enabled": "yes"}, "invalid"),
        (ADMIN, {"enabled": True, "message": 5}, "invalid"),
        (ADMIN, {"enabled": True, "message": LONG}, "invalid"),
        (ADMIN, {"message": "no switch"}, "invalid"),
        (ALICE, {"enabled": True}, "forbidden"),
    ],
    "notify.admin_message": [
        (ADMIN, {"user": BOB, "message": ""}, "invalid"),
        (ADMIN, {"user": BOB, "message": LONG}, "invalid"),
        (ADMIN, {"user": 5, "message": "m"}, "invalid"),
        (ADMIN, {"user": "", "message": "m"}, "invalid"),
        (ALICE, {"user": BOB, "message": "m"}, "forbidden"),
    ],
}


def test_every_socket_operation_is_in_both_tables() -> None:
    assert set(GOOD) == set(OPERATIONS) == set(BAD) == set(ROUTES)
    # Only operations that take nothing and are HTTP GETs lack bad input: a GET ignores
    # stray query parameters (a browser adds some), the socket refuses stray arguments.
    for op, cases in BAD.items():
        if not cases:
            assert OPERATIONS[op].args is s.NoArgs and ROUTES[op][0] == "GET", op


class Doors:
    """The same call through the socket and through the HTTP API."""

    def __init__(
        self,
        ctx: Context,
        path: Path,
        users: dict[str, TestUser],
        client: FlaskClient,
        bearer: Callable[[str], Headers],
    ) -> None:
        self.ctx, self.path, self.users, self.client, self.bearer = ctx, path, users, client, bearer

    def fill(self, op: str, args: Args) -> Args:
        """`args` with NEW replaced by a fresh allocation of alice's (GPUs freed first);
        bob locked out for the lockout operations, so there is one to list and lift."""
        if op.startswith("lockouts."):
            with self.ctx.db.transaction() as session:
                lockouts.lock_out(session, self.ctx.settings, BOB, "parity test")
        if NEW_REQUEST in args.values():
            row = queue.submit(self.ctx.db, self.ctx.settings, ALICE, "a100", 1, 1)
            return {k: row.id if v == NEW_REQUEST else v for k, v in args.items()}
        if NEW_BOOKING in args.values():
            start = utcnow() + timedelta(days=1)
            got = reservations.book(self.ctx.db, self.ctx.settings, ALICE, "4090", 1, start, 1)
            return {k: got.id if v == NEW_BOOKING else v for k, v in args.items()}
        if NEW not in args.values():
            return args
        allocations.release_all(self.ctx.db, self.ctx.settings, ALICE)
        (row,) = allocations.request(self.ctx.db, self.ctx.settings, ALICE, "4090", 1, 1)
        return {k: row.id if v == NEW else v for k, v in args.items()}

    def socket(self, user: str, op: str, args: Args) -> dict[str, Any]:
        return call_as(self.users[user], self.path, op, **self.fill(op, args))

    def http(self, user: str, op: str, args: Args) -> dict[str, Any]:
        method, path, body = http_request_for(op, self.fill(op, args))
        reply = self.client.open(path, method=method, json=body, headers=self.bearer(user))
        answer = reply.get_json()
        assert isinstance(answer, dict), (op, reply.status_code, reply.get_data(as_text=True))
        if reply.status_code >= 400:
            assert set(answer) == {"error"}, answer
            return answer
        return {"result": answer}

    def reset(self) -> None:
        allocations.reset(self.ctx.db, self.ctx.settings, ADMIN)


@pytest.fixture
def doors(
    ctx: Context,
    device_dir: Path,
    users: dict[str, TestUser],
    client: FlaskClient,
    bearer: Callable[[str], Headers],
) -> Iterator[Doors]:
    path = device_dir.parent / "run" / "gl.sock"
    server = localapi.start(ctx, path)
    try:
        yield Doors(ctx, path, users, client, bearer)
    finally:
        server.close()


def shape(value: Any) -> Any:
    """The keys of an answer, all the way down (lists by their first item)."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return None


@pytest.mark.parametrize("op", sorted(GOOD))
def test_both_doors_answer_with_the_same_keys(op: str, doors: Doors) -> None:
    user, args = GOOD[op]
    over_socket = doors.socket(user, op, args)
    doors.reset()
    over_http = doors.http(user, op, args)
    assert "result" in over_socket, over_socket
    assert "result" in over_http, over_http
    assert shape(over_socket["result"]) == shape(over_http["result"])
    # and the shape is the one the operation declares
    OPERATIONS[op].answer.model_validate(over_socket["result"])
    OPERATIONS[op].answer.model_validate(over_http["result"])


@pytest.mark.parametrize("op", sorted(op for op, cases in BAD.items() if cases))
def test_both_doors_refuse_bad_input_with_the_same_code(op: str, doors: Doors) -> None:
    for user, args, code in BAD[op]:
        over_socket = doors.socket(user, op, args)
        over_http = doors.http(user, op, args)
        assert over_socket.get("error", {}).get("code") == code, (args, over_socket)
        assert over_http.get("error", {}).get("code") == code, (args, over_http)


@pytest.mark.parametrize(("silent_for", "agent"), [(30, "running"), (90, "not running")])
def test_both_doors_judge_the_agent_alive_by_one_threshold(
    silent_for: int, agent: str, doors: Doors
) -> None:
    """AGENT_STALE_SECONDS (60 by default) on both: 30 s of silence is alive, 90 s is not
    (the socket used to say 5 s, the API 30 s)."""
    assert doors.ctx.settings.agent_stale_seconds == 60
    for door in (doors.socket, doors.http):
        doors.reset()
        with doors.ctx.db.transaction() as session:
            heartbeat.beat(session, heartbeat.agent_name(doors.ctx.settings.gpu_host))
            row = heartbeat.last(session, heartbeat.agent_name(doors.ctx.settings.gpu_host))
            assert row is not None
            row.at = utcnow() - timedelta(seconds=silent_for)
        answer = door(ALICE, "allocations.request", GOOD["allocations.request"][1])
        if agent == "running":
            assert (answer["result"]["agent"], answer["result"]["access"]) == (agent, "pending")
        else:  # a silent host's GPUs are not granted (SPEC §10), saying why, on both doors
            assert answer["error"]["code"] == "not_enough_gpus", answer
            assert "AGENT_STALE_SECONDS" in answer["error"]["message"]
