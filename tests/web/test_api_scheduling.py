"""The HTTP endpoints of SPEC section 11 (thin over scheduling_ops), on both databases."""

from __future__ import annotations

# ruff: noqa: F811  (the api fixtures are imported, then used as arguments)
from datetime import timedelta

from flask.testing import FlaskClient

from gpulocker import allocations
from gpulocker.context import Context
from gpulocker.models import utcnow
from tests.helpers import ADMIN, ALICE, BOB, CAROL
from tests.web.api_fixtures import app, bearer, client  # noqa: F401


def test_queue_requests_reservations_calendar_and_usage(
    ctx: Context, client: FlaskClient, bearer, users: dict
) -> None:
    allocations.request(ctx.db, ctx.settings, CAROL, "a100", 2, 2)
    a, b, admin = bearer(ALICE), bearer(BOB), bearer(ADMIN)
    r = client.post(
        "/api/v1/requests", json={"gpu_type": "a100", "count": 1, "hours": 1}, headers=a
    )
    assert r.status_code == 202, r.json
    mine = r.json["request"]
    assert mine["state"] == "waiting" and mine["position"] == 1
    client.post("/api/v1/requests", json={"gpu_type": "a100", "hours": 1}, headers=b)
    line = client.get("/api/v1/queue", headers=a).json["queue"]
    assert [e["user"] for e in line] == [ALICE, None]
    assert [e["user"] for e in client.get("/api/v1/queue", headers=admin).json["queue"]] == [
        ALICE,
        BOB,
    ]
    assert client.get(f"/api/v1/requests/{mine['id']}", headers=b).status_code == 404
    assert len(client.get("/api/v1/requests", headers=a).json["requests"]) == 1
    assert (
        client.delete(f"/api/v1/requests/{mine['id']}", headers=a).json["request"]["state"]
        == "cancelled"
    )
    assert client.delete(f"/api/v1/requests/{mine['id']}", headers=a).status_code == 409
    start = (utcnow() + timedelta(hours=3)).isoformat()
    body = {"gpu_type": "a100", "count": 2, "start": start, "hours": 2}
    r = client.post("/api/v1/reservations", json=body, headers=b)
    assert r.status_code == 201, r.json
    booking = r.json["reservation"]
    clash = client.post("/api/v1/reservations", json={**body, "count": 1}, headers=a)
    assert clash.status_code == 409 and clash.json["error"]["earliest"]
    bad = client.post("/api/v1/reservations", json={**body, "start": "soon"}, headers=a)
    assert bad.status_code == 422 and "ISO 8601" in bad.json["error"]["message"]
    assert (
        client.get("/api/v1/reservations?all=1", headers=admin).json["reservations"][0]["id"]
        == booking["id"]
    )
    cal = client.get("/api/v1/calendar?gpu_type=a100&days=2", headers=a).json
    assert len(cal["gpus"]) == 2 and all(len(g["items"]) == 2 for g in cal["gpus"])
    assert client.get("/api/v1/calendar?days=99", headers=a).status_code == 422
    assert (
        client.delete(f"/api/v1/reservations/{booking['id']}", headers=admin).json["reservation"][
            "state"
        ]
        == "cancelled"
    )
    usage = client.get("/api/v1/me/usage", headers=bearer(CAROL)).json
    assert usage["usage"]["gpus"] == 2 and "fairshare_usage" in usage
    assert client.get("/api/v1/queue").status_code == 401
