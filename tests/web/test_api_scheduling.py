"""The HTTP endpoints of SPEC section 11 (thin over the operations), on both databases:
waiting through POST /api/v1/allocations (202), the queue, bookings, calendar and usage."""

from __future__ import annotations

# ruff: noqa: F811  (the api fixtures are imported, then used as arguments)
from datetime import datetime, timedelta

from flask.testing import FlaskClient

from gpulocker import allocations, scheduler
from gpulocker.agent import localapi
from gpulocker.context import Context
from gpulocker.models import utcnow
from tests.helpers import ADMIN, ALICE, BOB, CAROL, cuda
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


def test_it_waits_in_line_with_wait_true_and_is_granted_later(
    ctx: Context, client: FlaskClient, bearer, users: dict
) -> None:
    held = allocations.request(ctx.db, ctx.settings, CAROL, "a100", 2, 2)
    a = bearer(ALICE)
    body = {"gpu_type": "a100", "count": 1, "hours": 1}
    refused = client.post("/api/v1/allocations", json=body, headers=a)
    assert refused.status_code == 409 and refused.json["error"]["code"] == "not_enough_gpus"
    r = client.post("/api/v1/allocations", json={**body, "wait": True, "wait_hours": 2}, headers=a)
    assert r.status_code == 202, r.json
    assert set(r.json) == {"request"}
    waiting = r.json["request"]
    assert (waiting["state"], waiting["position"], waiting["user"]) == ("waiting", 1, ALICE)
    assert waiting["allocation_ids"] == []
    left = datetime.fromisoformat(waiting["wait_until"]) - utcnow()
    assert timedelta(hours=1.9) < left <= timedelta(hours=2)
    # the same record as /api/v1/requests/{id} (one implementation)
    same = client.get(f"/api/v1/requests/{waiting['id']}", headers=a).json["request"]
    assert same == waiting

    allocations.release(ctx.db, ctx.settings, CAROL, held[0].id)
    assert scheduler.run_pass(ctx.db, ctx.settings).granted == 1
    granted = client.get(f"/api/v1/requests/{waiting['id']}", headers=a).json["request"]
    assert granted["state"] == "granted" and granted["position"] is None
    mine = client.get("/api/v1/allocations", headers=a).json["allocations"]
    assert [m["id"] for m in mine] == granted["allocation_ids"]
    assert granted["cuda_visible_devices"] == cuda(held[0].gpu_id)


def test_wait_true_is_granted_at_once_when_gpus_are_free(
    ctx: Context, client: FlaskClient, bearer, users: dict
) -> None:
    a = bearer(ALICE)
    body = {"gpu_type": "4090", "count": 2, "hours": 1, "wait": True}
    r = client.post("/api/v1/allocations", json=body, headers=a)
    assert r.status_code == 201, r.json
    assert r.json["cuda_visible_devices"] == cuda(0, 1)
    assert {"allocations", "access", "agent"} <= set(r.json)
    assert client.get("/api/v1/requests", headers=a).json["requests"] == []
    wrong = [
        {**body, "gpu_ids": [2], "count": None},  # a given GPU cannot wait
        {**body, "wait_hours": 10_000},  # past QUEUE_MAX_WAIT_HOURS
        {**body, "wait": "yes"},
    ]
    for bad in wrong:
        answer = client.post("/api/v1/allocations", json=bad, headers=a)
        assert answer.status_code == 422, (bad, answer.json)
    assert len(client.get("/api/v1/allocations", headers=a).json["allocations"]) == 2


def test_the_socket_request_op_waits_with_the_same_answer(
    ctx: Context, client: FlaskClient, bearer, users: dict
) -> None:
    allocations.request(ctx.db, ctx.settings, CAROL, "a100", 2, 2)
    args = {"gpu_type": "a100", "count": 1, "hours": 1, "wait": True}
    over_socket = localapi.handle(ctx, ALICE, {"op": "allocations.request", "args": args})
    over_http = client.post("/api/v1/allocations", json=args, headers=bearer(BOB))
    assert over_http.status_code == 202
    assert set(over_socket["result"]["request"]) == set(over_http.json["request"])
    assert over_socket["result"]["request"]["position"] == 1
    assert over_http.json["request"]["position"] == 2


def test_me_shows_usage_quota_and_fair_share(
    ctx: Context, client: FlaskClient, bearer, users: dict
) -> None:
    allocations.request(ctx.db, ctx.settings, CAROL, "a100", 2, 3)
    c = bearer(CAROL)
    me = client.get("/api/v1/me", headers=c).json
    usage = client.get("/api/v1/me/usage", headers=c).json
    assert me["username"] == CAROL and me["is_admin"] is False
    assert {k: me[k] for k in usage} == usage
    assert me["usage"]["gpus"] == 2 and me["usage"]["gpu_hours_week"] > 5.9
    assert me["limits"] == {"gpu_hours_per_week": None, "max_gpus": None}


def test_openapi_describes_waiting_on_post_allocations(client: FlaskClient) -> None:
    doc = client.get("/api/v1/openapi.json").json
    post = doc["paths"]["/api/v1/allocations"]["post"]
    assert set(post["responses"]) >= {"201", "202", "409"}
    assert post["responses"]["202"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/RequestOne"
    }
    fields = doc["components"]["schemas"]["AllocationRequest"]["properties"]
    assert {"wait", "wait_hours"} <= set(fields)
    me = doc["components"]["schemas"]["Me"]["properties"]
    assert {"usage", "limits", "fairshare_usage", "locked_until"} <= set(me)
