"""Every endpoint tried by bob on alice's things, and by nobody at all.

The table below must name every endpoint the API declares (a test checks), so a new
endpoint cannot ship without saying who may call it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from flask.testing import FlaskClient

from gpulocker import allocations, queue, reservations, tokens
from gpulocker.context import Context
from gpulocker.models import utcnow
from gpulocker.web import api, api_scheduling, health, records_api
from gpulocker.web.openapi import OPERATIONS
from tests.helpers import ALICE, BOB
from tests.web.api_fixtures import Headers, app, bearer, client

__all__ = [
    "api",
    "api_scheduling",
    "app",
    "bearer",
    "client",
    "health",
    "records_api",
]  # the modules declare the endpoints


@dataclass(frozen=True)
class Try:
    """One call bob makes, and what he must get."""

    method: str
    path: str
    status: int
    body: dict[str, Any] | None = None
    anonymous: int = 401  # what a caller with no credentials gets


# `{alloc}`, `{token}`, `{note}` are alice's; bob must never reach them.
BOB_TRIES: dict[str, Try] = {
    "gpu_status": Try("GET", "/api/gpu_status", 200, anonymous=200),
    "gpus": Try("GET", "/api/v1/gpus", 200),
    "gpu_history": Try("GET", "/api/v1/gpus/0/history", 200),
    "create_token": Try(
        "POST", "/api/v1/tokens", 401, {"username": ALICE, "password": "guess"}, 401
    ),
    "list_tokens": Try("GET", "/api/v1/tokens", 200),
    "revoke_token": Try("DELETE", "/api/v1/tokens/{token}", 404),
    "who_am_i": Try("GET", "/api/v1/me", 200),
    "list_allocations": Try("GET", "/api/v1/allocations?all=1&state=active", 200),
    "request_allocation": Try(
        "POST",
        "/api/v1/allocations",
        403,
        {"gpu_type": "4090", "count": 1, "hours": 1, "user": ALICE},
    ),
    "get_allocation": Try("GET", "/api/v1/allocations/{alloc}", 404),
    "extend_allocation": Try("POST", "/api/v1/allocations/{alloc}/extend", 404, {"hours": 1}),
    "release_allocation": Try("DELETE", "/api/v1/allocations/{alloc}", 404),
    "release_all_allocations": Try("POST", "/api/v1/allocations/release", 403, {"user": ALICE}),
    "list_events": Try("GET", f"/api/v1/events?user={ALICE}", 403),
    "list_notifications": Try("GET", "/api/v1/notifications", 200),
    "read_notification": Try("POST", "/api/v1/notifications/{note}/read", 404),
    "disk_usage": Try("GET", "/api/v1/disk?all=1", 403),
    "admin_reset": Try("POST", "/api/v1/admin/reset", 403),
    "admin_maintenance": Try("POST", "/api/v1/admin/maintenance", 403, {"enabled": True}),
    "admin_notify": Try("POST", "/api/v1/admin/notify", 403, {"user": ALICE, "message": "x"}),
    "admin_lockouts": Try("GET", "/api/v1/admin/lockouts", 403),
    "admin_lift_lockout": Try("DELETE", f"/api/v1/admin/lockouts/{ALICE}", 403),
    # SPEC section 11 (web/api_scheduling.py)
    "queue": Try("GET", "/api/v1/queue", 200),
    "submit": Try("POST", "/api/v1/requests", 403, {"gpu_type": "4090", "hours": 1, "user": ALICE}),
    "list_requests": Try("GET", "/api/v1/requests?all=1", 200),
    "get_request": Try("GET", "/api/v1/requests/{req}", 404),
    "cancel_request": Try("DELETE", "/api/v1/requests/{req}", 404),
    "book": Try(
        "POST",
        "/api/v1/reservations",
        403,
        {"gpu_type": "4090", "start": "2030-01-01T00:00Z", "hours": 1, "user": ALICE},
    ),
    "list_reservations": Try("GET", "/api/v1/reservations?all=1", 200),
    "get_reservation": Try("GET", "/api/v1/reservations/{res}", 404),
    "cancel_reservation": Try("DELETE", "/api/v1/reservations/{res}", 404),
    "calendar": Try("GET", "/api/v1/calendar?gpu_type=a100", 200),
    "usage": Try("GET", "/api/v1/me/usage", 200),
    "openapi": Try("GET", "/api/v1/openapi.json", 200, anonymous=200),
    "healthz": Try("GET", "/healthz", 200, anonymous=200),
    "metrics": Try("GET", "/metrics", 200, anonymous=200),
}


@pytest.fixture
def alices_things(ctx: Context, users: dict[str, Any]) -> dict[str, int]:
    """An active allocation, an API token and a notification of alice's."""
    row = allocations.request(ctx.db, ctx.settings, ALICE, "4090", 1, 2)[0]
    token, _raw = tokens.create(ctx.db, ALICE, "alice's laptop")
    with ctx.db.session() as session:
        from gpulocker import inbox

        note = inbox.list_for(session, ALICE)[-1]
    waiting = queue.submit(ctx.db, ctx.settings, ALICE, "a100", 2, 1)
    start = utcnow() + timedelta(hours=3)
    booking = reservations.book(ctx.db, ctx.settings, ALICE, "a100", 1, start, 1)
    return {
        "alloc": row.id,
        "token": token.id,
        "note": note.id,
        "req": waiting.id,
        "res": booking.id,
        "unread": 3,  # granted, queued, booked
    }


def call(client: FlaskClient, attempt: Try, things: dict[str, int], headers: Headers) -> Any:
    path = attempt.path.format(**things)
    return client.open(path, method=attempt.method, json=attempt.body, headers=headers)


def test_the_table_names_every_endpoint() -> None:
    assert {op.name for op in OPERATIONS} == set(BOB_TRIES)


@pytest.mark.parametrize("name", sorted(BOB_TRIES))
def test_bob_never_reaches_alices_things(
    name: str,
    client: FlaskClient,
    bearer: Callable[[str], Headers],
    alices_things: dict[str, int],
    ctx: Context,
) -> None:
    attempt = BOB_TRIES[name]
    answer = call(client, attempt, alices_things, bearer(BOB))
    assert answer.status_code == attempt.status, answer.get_data(as_text=True)
    assert ALICE not in _private_part(name, answer.get_json(silent=True))
    with ctx.db.session() as session:
        mine = allocations.get(session, ctx.settings, ALICE, alices_things["alloc"])
        assert mine.state == "active" and mine.user == ALICE
        assert [t.id for t in tokens.list_for(session, ALICE)] == [alices_things["token"]]
        from gpulocker import inbox

        assert inbox.unread_count(session, ALICE) == alices_things["unread"]


def _private_part(name: str, body: Any) -> str:
    """What of the answer would leak alice's things (the GPU status shows holders by design,
    and a refusal may name her as the target bob asked about)."""
    if name in ("gpu_status", "gpus") or body is None or "error" in (body or {}):
        return ""
    return str(body)


@pytest.mark.parametrize("name", sorted(BOB_TRIES))
def test_nobody_gets_only_what_is_public(
    name: str, client: FlaskClient, alices_things: dict[str, int]
) -> None:
    attempt = BOB_TRIES[name]
    answer = call(client, attempt, alices_things, {})
    assert answer.status_code == attempt.anonymous
    if answer.status_code == 401:
        assert answer.get_json()["error"]["code"] == "unauthorized"
    if name == "gpu_status":
        assert ALICE not in answer.get_data(as_text=True)


def test_an_admin_reaches_everything(
    client: FlaskClient, bearer: Callable[[str], Headers], alices_things: dict[str, int]
) -> None:
    from tests.helpers import ADMIN

    admin = bearer(ADMIN)
    path = f"/api/v1/allocations/{alices_things['alloc']}"
    assert client.get(path, headers=admin).status_code == 200
    assert client.post(path + "/extend", json={"hours": 1}, headers=admin).status_code == 200
    assert client.delete(path, headers=admin).get_json()["allocation"]["state"] == "released"
    events = client.get(f"/api/v1/events?user={ALICE}", headers=admin).get_json()["events"]
    assert events and all(e["user"] == ALICE for e in events)
