"""The JSON API over the real app: sign-in, sessions, allocations, status, admin, health."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import flask
import pytest
from flask import Flask
from flask.testing import FlaskClient

from gpulocker import allocations, live, lockouts, tokens
from gpulocker.agent import loop as agent
from gpulocker.config import Settings
from gpulocker.context import Context
from gpulocker.db import Database
from gpulocker.gpus.simulated import SimulatedBackend, write_load
from gpulocker.models import GpuSample, utcnow
from gpulocker.web import create_app
from gpulocker.web.session import login_user, logout_user
from gpulocker.web.status_cache import STATUS_CACHE
from tests.conftest import REDIS_URL, TEST_HOST
from tests.helpers import ADMIN, ALICE, BOB, TestUser, cuda
from tests.web.api_fixtures import Headers, app, bearer, client

__all__ = ["app", "bearer", "client"]  # fixtures used here

Bearer = Callable[[str], Headers]


def error_of(response: flask.Response) -> dict[str, str]:
    body = response.get_json()
    assert set(body) == {"error"} and {"code", "message"} <= set(body["error"])
    return body["error"]


# --- signing in ---------------------------------------------------------------------------


def test_it_gives_a_token_for_a_linux_password(
    client: FlaskClient, users: dict[str, TestUser], pam_service: str
) -> None:
    answer = client.post(
        "/api/v1/tokens", json={"username": ALICE, "password": users[ALICE].password}
    )
    assert answer.status_code == 201
    token = answer.get_json()["token"]
    me = client.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"})
    assert me.get_json() == {
        "username": ALICE,
        "is_admin": False,
        "locked_until": None,
        "usage": {"gpus": 0, "gpu_hours_week": 0},
        "limits": {"gpu_hours_per_week": None, "max_gpus": None},
        "fairshare_usage": 0,
    }


def test_it_does_not_say_whether_the_user_exists(
    client: FlaskClient, users: dict[str, TestUser], pam_service: str
) -> None:
    wrong = client.post("/api/v1/tokens", json={"username": ALICE, "password": "nope"})
    unknown = client.post("/api/v1/tokens", json={"username": "nobody_glt", "password": "nope"})
    assert wrong.status_code == unknown.status_code == 401
    assert error_of(wrong) == error_of(unknown)


def test_it_throttles_failed_sign_ins_with_429_and_retry_after(
    client: FlaskClient, users: dict[str, TestUser], pam_service: str
) -> None:
    for _ in range(5):
        assert (
            client.post("/api/v1/tokens", json={"username": BOB, "password": "x"}).status_code
            == 401
        )
    answer = client.post("/api/v1/tokens", json={"username": BOB, "password": users[BOB].password})
    assert answer.status_code == 429
    assert error_of(answer)["code"] == "throttled"
    assert 800 < int(answer.headers["Retry-After"]) <= 900


def test_it_lists_and_revokes_own_tokens(client: FlaskClient, ctx: Context) -> None:
    row, raw = tokens.create(ctx.db, ALICE, "laptop")
    headers = {"Authorization": f"Bearer {raw}"}
    listed = client.get("/api/v1/tokens", headers=headers).get_json()["tokens"]
    assert [t["name"] for t in listed] == ["laptop"] and "token_hash" not in listed[0]
    assert client.delete(f"/api/v1/tokens/{row.id}", headers=headers).status_code == 200
    assert client.get("/api/v1/me", headers=headers).status_code == 401


def test_it_refuses_a_bad_bearer_token(client: FlaskClient) -> None:
    for header in ("Bearer glk_nope", "Basic abc", "Bearer "):
        answer = client.get("/api/v1/me", headers={"Authorization": header})
        assert answer.status_code == 401 and error_of(answer)["code"] == "unauthorized"


# --- sessions -----------------------------------------------------------------------------


def session_cookie(app: Flask, user: str) -> tuple[str, str]:
    """Sign `user` in as the login page does; returns (Set-Cookie header, cookie value)."""
    with app.test_request_context("/login", method="POST"):
        login_user(user)
        response = app.make_response("signed in")
        app.session_interface.save_session(app, flask.session, response)
    header = response.headers["Set-Cookie"]
    return header, header.split(";", 1)[0].split("=", 1)[1]


def test_it_sets_a_safe_session_cookie(app: Flask, ctx: Context) -> None:
    header, _value = session_cookie(app, ALICE)
    assert "HttpOnly" in header and "SameSite=Lax" in header and "Secure" not in header
    secure_app = create_app(ctx=Context(ctx.settings.with_overrides(ssl_cert="c", ssl_key="k")))
    header, _value = session_cookie(secure_app, ALICE)
    assert "Secure" in header


def test_it_ends_a_session_for_real_on_logout(app: Flask, client: FlaskClient) -> None:
    _header, value = session_cookie(app, ALICE)
    client.set_cookie("gpulocker_session", value)
    assert client.get("/api/v1/me").get_json()["username"] == ALICE
    with app.test_request_context("/logout", headers={"Cookie": f"gpulocker_session={value}"}):
        assert flask.session["user"] == ALICE
        logout_user()
        assert "token" not in flask.session
    thief = app.test_client()
    thief.set_cookie("gpulocker_session", value)  # a copy of the old cookie
    assert thief.get("/api/v1/me").status_code == 401


def test_it_wants_the_csrf_token_for_cookie_writes(app: Flask, client: FlaskClient) -> None:
    _header, value = session_cookie(app, ALICE)
    client.set_cookie("gpulocker_session", value)
    body = {"gpu_type": "4090", "count": 1, "hours": 1}
    refused = client.post("/api/v1/allocations", json=body)
    assert refused.status_code == 403 and "CSRF" in error_of(refused)["message"]
    with client.session_transaction() as stored:
        csrf = stored["csrf_token"]
    granted = client.post("/api/v1/allocations", json=body, headers={"X-CSRF-Token": csrf})
    assert granted.status_code == 201


# --- allocations --------------------------------------------------------------------------


def test_it_allocates_lists_extends_and_releases(client: FlaskClient, bearer: Bearer) -> None:
    alice = bearer(ALICE)
    granted = client.post(
        "/api/v1/allocations", json={"gpu_type": "4090", "count": 2, "hours": 1.5}, headers=alice
    )
    assert granted.status_code == 201
    body = granted.get_json()
    assert [a["gpu_id"] for a in body["allocations"]] == [0, 1]
    assert body["cuda_visible_devices"] == cuda(0, 1)
    assert (body["access"], body["agent"]) == ("pending", "not running")
    first = body["allocations"][0]["id"]
    listed = client.get("/api/v1/allocations", headers=alice).get_json()["allocations"]
    assert sorted(a["gpu_id"] for a in listed) == [0, 1]
    extended = client.post(f"/api/v1/allocations/{first}/extend", json={"hours": 1}, headers=alice)
    assert extended.status_code == 200
    assert extended.get_json()["allocation"]["expires_at"] > body["allocations"][0]["expires_at"]
    released = client.delete(f"/api/v1/allocations/{first}", headers=alice)
    assert released.get_json()["allocation"]["state"] == "released"
    again = client.delete(f"/api/v1/allocations/{first}", headers=alice)
    assert again.status_code == 409 and error_of(again)["code"] == "conflict"
    history = client.get("/api/v1/allocations?state=released", headers=alice).get_json()
    assert [a["id"] for a in history["allocations"]] == [first]


def test_it_answers_409_naming_how_many_are_free(client: FlaskClient, bearer: Bearer) -> None:
    answer = client.post(
        "/api/v1/allocations",
        json={"gpu_type": "a100", "count": 3, "hours": 1},
        headers=bearer(ALICE),
    )
    assert answer.status_code == 409
    assert error_of(answer) == {
        "code": "not_enough_gpus",
        "message": "not enough free a100 GPUs: asked for 3, 2 free",
        "free": 2,
    }


@pytest.mark.parametrize(
    "body",
    [
        {"gpu_type": "4090", "count": "2", "hours": 1},
        {"gpu_type": "4090", "count": 0, "hours": 1},
        {"gpu_type": "4090", "count": 1, "hours": 0},
        {"gpu_type": "4090", "count": 1, "hours": 1000},
        {"gpu_type": "h100", "count": 1, "hours": 1},
        {"gpu_type": "4090", "count": 1},
        {"gpu_type": "4090\x00", "count": 1, "hours": 1},
        {"gpu_type": "4090", "count": 1, "hours": 1, "surprise": True},
        [1, 2],
    ],
)
def test_it_answers_422_for_bad_input(client: FlaskClient, bearer: Bearer, body: object) -> None:
    answer = client.post("/api/v1/allocations", json=body, headers=bearer(ALICE))
    assert answer.status_code == 422 and error_of(answer)["code"] == "invalid"


def test_it_answers_422_for_a_body_that_is_not_json(client: FlaskClient, bearer: Bearer) -> None:
    answer = client.post(
        "/api/v1/allocations",
        data="{not json",
        headers={**bearer(ALICE), "Content-Type": "application/json"},
    )
    assert answer.status_code == 422


def test_it_answers_403_when_locked_out_or_in_maintenance(
    client: FlaskClient, bearer: Bearer, ctx: Context
) -> None:
    body = {"gpu_type": "4090", "count": 1, "hours": 1}
    with ctx.db.transaction() as session:
        lockouts.lock_out(session, ctx.settings, BOB, "used GPU 3 without holding it")
    locked = client.post("/api/v1/allocations", json=body, headers=bearer(BOB))
    assert locked.status_code == 403 and error_of(locked)["code"] == "locked_out"
    assert client.get("/api/v1/me", headers=bearer(BOB)).get_json()["locked_until"]
    on = client.post("/api/v1/admin/maintenance", json={"enabled": True}, headers=bearer(ADMIN))
    assert on.get_json() == {"enabled": True, "message": ""}
    paused = client.post("/api/v1/allocations", json=body, headers=bearer(ALICE))
    assert paused.status_code == 403 and error_of(paused)["code"] == "maintenance"
    assert client.post("/api/v1/allocations", json=body, headers=bearer(ADMIN)).status_code == 201


def test_it_answers_once_the_agent_has_applied_access(
    client: FlaskClient, bearer: Bearer, ctx: Context, users: dict[str, TestUser]
) -> None:
    running, stop, thread = agent.start_in_thread(Context(ctx.settings))
    try:
        from tests.helpers import wait_for

        wait_for(lambda: client.get("/healthz").get_json()["status"] == "ok", timeout=10)
        answer = client.post(
            "/api/v1/allocations",
            json={"gpu_type": "a100", "count": 1, "hours": 1},
            headers=bearer(ALICE),
        )
    finally:
        stop.set()
        thread.join(10)
        running.close()
    body = answer.get_json()
    assert (body["access"], body["agent"]) == ("applied", "running")
    assert body["allocations"][0]["access_applied_at"] is not None


def test_an_admin_allocates_for_a_user_and_sees_everyone(
    client: FlaskClient, bearer: Bearer
) -> None:
    made = client.post(
        "/api/v1/allocations",
        json={"gpu_type": "4090", "gpu_ids": [2], "hours": 1, "user": BOB},
        headers=bearer(ADMIN),
    )
    assert made.status_code == 201 and made.get_json()["allocations"][0]["user"] == BOB
    every = client.get("/api/v1/allocations?all=1", headers=bearer(ADMIN)).get_json()
    assert [a["user"] for a in every["allocations"]] == [BOB]


# --- GPU status ---------------------------------------------------------------------------


def test_it_shows_gpu_status_with_holders_to_signed_in_users_only(
    client: FlaskClient, bearer: Bearer, ctx: Context
) -> None:
    allocations.request(ctx.db, ctx.settings, ALICE, "4090", 1, 2)
    signed_in = client.get("/api/gpu_status", headers=bearer(BOB)).get_json()
    assert len(signed_in["gpus"]) == 6
    assert signed_in["gpus"][0]["holder"] == ALICE and signed_in["gpus"][0]["expires_at"]
    anonymous = client.get("/api/gpu_status").get_json()
    assert len(anonymous["gpus"]) == 6
    assert all(g["holder"] is None and g["processes"] == [] for g in anonymous["gpus"])
    assert "utilization" in anonymous["gpus"][0]


def test_it_hides_gpu_status_when_not_public(ctx: Context) -> None:
    private = create_app(ctx=Context(ctx.settings.with_overrides(public_gpu_status=False)))
    assert private.test_client().get("/api/gpu_status").status_code == 401


def test_it_gives_history_downsampled(client: FlaskClient, bearer: Bearer, ctx: Context) -> None:
    now = utcnow()
    with ctx.db.transaction() as session:
        session.add_all(
            GpuSample(
                host=TEST_HOST,
                gpu_id=1,
                at=now - timedelta(seconds=30 * i),
                utilization=float(i % 100),
                memory_used_mib=100.0,
            )
            for i in range(2500)
        )
    answer = client.get("/api/v1/gpus/1/history?hours=24", headers=bearer(ALICE)).get_json()
    assert 500 < len(answer["points"]) <= 1000
    assert answer["points"][0]["at"] < answer["points"][-1]["at"]
    short = client.get("/api/v1/gpus/1/history?hours=0.5", headers=bearer(ALICE)).get_json()
    assert len(short["points"]) == 60
    assert client.get("/api/v1/gpus/77/history", headers=bearer(ALICE)).status_code == 404


# --- events, inbox, admin -----------------------------------------------------------------


def test_it_pages_the_audit_log(client: FlaskClient, bearer: Bearer, ctx: Context) -> None:
    for _ in range(3):
        allocations.request(ctx.db, ctx.settings, ALICE, "4090", 1, 1)
    first = client.get("/api/v1/events?kind=granted&limit=2", headers=bearer(ADMIN)).get_json()
    assert len(first["events"]) == 2 and first["next_before_id"]
    rest = client.get(
        f"/api/v1/events?kind=granted&limit=2&before_id={first['next_before_id']}",
        headers=bearer(ADMIN),
    ).get_json()
    assert len(rest["events"]) == 1 and rest["next_before_id"] is None
    own = client.get("/api/v1/events", headers=bearer(BOB)).get_json()["events"]
    assert own and all(e["user"] == BOB for e in own)  # bob's token, none of alice's grants


def test_it_lists_and_marks_notifications_read(
    client: FlaskClient, bearer: Bearer, ctx: Context
) -> None:
    allocations.request(ctx.db, ctx.settings, ALICE, "4090", 1, 1)
    inbox = client.get("/api/v1/notifications", headers=bearer(ALICE)).get_json()
    assert inbox["unread"] == 1 and inbox["notifications"][0]["kind"] == "granted"
    note = inbox["notifications"][0]["id"]
    read = client.post(f"/api/v1/notifications/{note}/read", headers=bearer(ALICE))
    assert read.get_json()["notification"]["read_at"]
    assert client.get("/api/v1/notifications", headers=bearer(ALICE)).get_json()["unread"] == 0


def test_admins_reset_message_and_lift_lockouts(
    client: FlaskClient, bearer: Bearer, ctx: Context
) -> None:
    admin = bearer(ADMIN)
    allocations.request(ctx.db, ctx.settings, ALICE, "4090", 2, 1)
    assert client.post("/api/v1/admin/reset", headers=admin).get_json() == {"count": 2}
    sent = client.post("/api/v1/admin/notify", json={"user": ALICE, "message": "hi"}, headers=admin)
    assert sent.get_json() == {"ok": True}
    messages = client.get("/api/v1/notifications", headers=bearer(ALICE)).get_json()[
        "notifications"
    ]
    assert any("hi" in n["message"] for n in messages)
    with ctx.db.transaction() as session:
        lockouts.lock_out(session, ctx.settings, BOB, "violation")
    assert [
        x["user"]
        for x in client.get("/api/v1/admin/lockouts", headers=admin).get_json()["lockouts"]
    ] == [BOB]
    assert client.delete(f"/api/v1/admin/lockouts/{BOB}", headers=admin).get_json() == {"count": 1}
    assert client.delete(f"/api/v1/admin/lockouts/{BOB}", headers=admin).status_code == 404


def test_it_shows_disk_usage(
    client: FlaskClient, bearer: Bearer, users: dict[str, TestUser]
) -> None:
    mine = client.get("/api/v1/disk", headers=bearer(ALICE)).get_json()
    assert mine["usage"]["user"] == ALICE and mine["usage"]["home"] == users[ALICE].home
    every = client.get("/api/v1/disk?all=1", headers=bearer(ADMIN)).get_json()
    assert ALICE in [u["user"] for u in every["users"]]


# --- health, metrics, description ---------------------------------------------------------


def test_it_reports_health_and_metrics(client: FlaskClient, bearer: Bearer, ctx: Context) -> None:
    health = client.get("/healthz").get_json()
    assert health["database"]["ok"] and health["status"] == "degraded"  # no agent yet
    assert health["notifications"] == {"pending": 0, "failed": 0, "oldest_pending_seconds": 0.0}
    client.post(
        "/api/v1/allocations",
        json={"gpu_type": "a100", "count": 9, "hours": 1},
        headers=bearer(ALICE),
    )
    allocations.request(ctx.db, ctx.settings, ALICE, "4090", 1, 1)
    text = client.get("/metrics").get_data(as_text=True)
    assert 'gpulocker_gpus{state="allocated"} 1' in text
    assert 'gpulocker_gpus{state="free"} 5' in text
    assert 'gpulocker_allocations{state="active"} 1' in text
    assert 'gpulocker_refusals_total{reason="not_enough_gpus"} 1' in text
    assert 'gpulocker_http_requests_total{status="4xx"} 1' in text
    assert 'gpulocker_outbox_messages{state="pending"} 0' in text


def test_it_describes_itself_as_openapi(client: FlaskClient) -> None:
    spec = client.get("/api/v1/openapi.json").get_json()
    assert spec["openapi"].startswith("3.")
    post = spec["paths"]["/api/v1/allocations"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/AllocationRequest"
    )
    assert {"201", "401", "403", "409", "422"} <= set(post["responses"])
    assert "/api/gpu_status" in spec["paths"] and "/healthz" in spec["paths"]


def test_it_answers_json_404_for_unknown_api_paths(client: FlaskClient, bearer: Bearer) -> None:
    assert error_of(client.get("/api/v1/nothing"))["code"] == "not_found"
    big = client.get(f"/api/v1/allocations/{2**40}", headers=bearer(ALICE))
    assert big.status_code == 404


# --- the cached status --------------------------------------------------------------------


def holders(client: FlaskClient, headers: Headers) -> list[str | None]:
    return [g["holder"] for g in client.get("/api/gpu_status", headers=headers).get_json()["gpus"]]


def test_the_status_shows_writes_through_the_server_at_once(
    app: Flask, client: FlaskClient, bearer: Bearer
) -> None:
    app.extensions[STATUS_CACHE].recheck = 3600  # the database is never re-read
    assert holders(client, bearer(ALICE))[0] is None
    body = {"gpu_type": "4090", "count": 1, "hours": 1}
    client.post("/api/v1/allocations", json=body, headers=bearer(ALICE))
    assert holders(client, bearer(ALICE))[0] == ALICE


def test_the_status_shows_changes_made_elsewhere_once_rechecked(
    app: Flask, client: FlaskClient, bearer: Bearer, ctx: Context
) -> None:
    cache = app.extensions[STATUS_CACHE]
    cache.recheck = 3600
    assert holders(client, bearer(BOB))[0] is None
    allocations.request(ctx.db, ctx.settings, ALICE, "4090", 1, 1)  # as the agent or CLI would
    assert holders(client, bearer(BOB))[0] is None  # cached: not re-read yet
    cache.recheck = 0
    assert holders(client, bearer(BOB))[0] == ALICE


def test_the_status_follows_live_samples_in_redis(
    settings: Settings, db: Database, redis_client: object, bearer: Bearer
) -> None:
    redis_ctx = Context(settings.with_overrides(redis_url=REDIS_URL))
    app = create_app(ctx=redis_ctx)
    app.extensions[STATUS_CACHE].recheck = 0
    client = app.test_client()
    backend = SimulatedBackend(settings.gpu_config, settings.device_path)
    write_load(settings.device_path, 5, 42.0, 1024.0, None)
    live.publish(redis_ctx, TEST_HOST, backend.sample())
    gpus = client.get("/api/gpu_status").get_json()["gpus"]
    assert gpus[5]["utilization"] == 42.0
    write_load(settings.device_path, 5, 77.0, 1024.0, None)
    live.publish(redis_ctx, TEST_HOST, backend.sample())
    assert client.get("/api/gpu_status").get_json()["gpus"][5]["utilization"] == 77.0
    redis_ctx.close()


def test_it_filters_events_by_time(client: FlaskClient, bearer: Bearer, ctx: Context) -> None:
    allocations.request(ctx.db, ctx.settings, ALICE, "4090", 1, 1)
    now = utcnow()
    later = (now + timedelta(minutes=1)).replace(tzinfo=None).isoformat()
    earlier = (now - timedelta(minutes=1)).isoformat().replace("+00:00", "Z")
    admin = bearer(ADMIN)
    assert (
        client.get(f"/api/v1/events?kind=granted&since={later}", headers=admin).get_json()["events"]
        == []
    )
    found = client.get(f"/api/v1/events?kind=granted&since={earlier}", headers=admin).get_json()
    assert [e["user"] for e in found["events"]] == [ALICE]
    assert client.get("/api/v1/events?since=yesterday", headers=admin).status_code == 422


@pytest.mark.parametrize(
    "query", ["since=9999-12-31T23:59:59-05:00", "until=0001-01-01T00:00:00%2B05:00"]
)
def test_a_time_at_the_edge_of_the_calendar_is_refused_not_a_500(
    client: FlaskClient, bearer: Bearer, query: str
) -> None:
    response = client.get(f"/api/v1/events?{query}", headers=bearer(ADMIN))
    assert response.status_code == 422
    assert "out of range" in response.get_json()["error"]["message"]
