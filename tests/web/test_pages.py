"""The HTML pages through Flask's test client: real PAM sign-in, real databases, CSRF,
escaping, the forms' refusals next to their fields, and the admin pages."""

from __future__ import annotations

import re
from collections.abc import Iterator
from html.parser import HTMLParser

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select

from gpulocker import allocations, auth, lockouts, maintenance
from gpulocker.context import Context
from gpulocker.models import ACTIVE, Allocation, Event, Notification
from gpulocker.notify import notify
from gpulocker.web import create_app
from tests.helpers import ADMIN, ALICE, BOB, TestUser, export

pytestmark = pytest.mark.root

SCRIPT = "<script>alert('x')</script>"
ESCAPED = "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;"


@pytest.fixture
def app(ctx: Context, pam_service: str, users: dict[str, TestUser]) -> Iterator[Flask]:
    """The real app on the test's database, signing in through the test PAM service."""
    assert ctx.settings.pam_service == pam_service
    application = create_app(ctx=ctx)
    application.config.update(TESTING=True)
    yield application


def csrf_of(html: str) -> str:
    """The CSRF token of the first form on a page."""
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "the page has no CSRF field"
    return match.group(1)


def sign_in(app: Flask, user: TestUser) -> FlaskClient:
    """A client signed in as `user` through the sign-in form."""
    client = app.test_client()
    token = csrf_of(client.get("/login").get_data(as_text=True))
    response = client.post(
        "/login",
        data={"username": user.name, "password": user.password, "csrf_token": token},
    )
    assert response.status_code == 302, response.get_data(as_text=True)
    return client


def post(client: FlaskClient, path: str, page: str = "/", **data: str) -> tuple[int, str]:
    """Post a form the way a browser would: with the token of the page it came from."""
    token = csrf_of(client.get(page).get_data(as_text=True))
    response = client.post(path, data={**data, "csrf_token": token})
    return response.status_code, response.get_data(as_text=True)


def active_of(ctx: Context, user: str) -> list[Allocation]:
    with ctx.db.session() as session:
        return list(
            session.scalars(
                select(Allocation).where(Allocation.user == user, Allocation.state == ACTIVE)
            )
        )


def test_it_sends_anonymous_visitors_to_sign_in(app: Flask) -> None:
    response = app.test_client().get("/schedule")
    assert response.status_code == 302
    assert response.headers["Location"].startswith("/login?next=/schedule")


def test_it_signs_in_and_shows_the_dashboard(app: Flask, users: dict[str, TestUser]) -> None:
    client = sign_in(app, users[ALICE])
    html = client.get("/").get_data(as_text=True)
    assert f"Hello, {ALICE}" in html
    assert "4090 — 4 of 4 free" in html and "a100 — 2 of 2 free" in html
    assert "You hold no GPUs right now." in html


def test_it_says_when_the_password_is_wrong(app: Flask, users: dict[str, TestUser]) -> None:
    client = app.test_client()
    token = csrf_of(client.get("/login").get_data(as_text=True))
    response = client.post(
        "/login", data={"username": ALICE, "password": "not-it", "csrf_token": token}
    )
    assert response.status_code == 401
    assert "Wrong user name or password." in response.get_data(as_text=True)
    assert client.get("/").status_code == 302


def test_it_says_when_sign_in_is_throttled(
    app: Flask, ctx: Context, users: dict[str, TestUser]
) -> None:
    attempt = auth.Attempt(BOB, "127.0.0.1")
    for _ in range(auth.USER_LIMIT):
        auth.record_failure(ctx, attempt)
    client = app.test_client()
    token = csrf_of(client.get("/login").get_data(as_text=True))
    response = client.post(
        "/login",
        data={"username": BOB, "password": users[BOB].password, "csrf_token": token},
    )
    assert response.status_code == 429
    assert "Too many failed sign-ins. Try again in about 15 min." in response.get_data(as_text=True)


def test_it_shows_maintenance_mode_on_the_sign_in_page(app: Flask, ctx: Context) -> None:
    maintenance.set_enabled(ctx.db, ctx.settings, ADMIN, True, "driver update")
    html = app.test_client().get("/login").get_data(as_text=True)
    assert "Maintenance mode." in html and "driver update" in html


def test_it_refuses_forms_without_the_csrf_token(
    app: Flask, ctx: Context, users: dict[str, TestUser]
) -> None:
    anonymous = app.test_client()
    response = anonymous.post("/login", data={"username": ALICE, "password": "x"})
    assert response.status_code == 403
    client = sign_in(app, users[ALICE])
    for data in ({}, {"csrf_token": "forged"}):
        response = client.post(
            "/allocations", data={"gpu_type": "4090", "count": "1", "duration": "1", **data}
        )
        assert response.status_code == 403
        assert "CSRF token" in response.get_data(as_text=True)
    assert active_of(ctx, ALICE) == []
    admin = sign_in(app, users[ADMIN])
    assert admin.post("/admin/maintenance", data={"enabled": "on"}).status_code == 403
    assert admin.post("/admin/reset", data={"confirm": "reset"}).status_code == 403
    with ctx.db.session() as session:
        assert not maintenance.enabled(session)


def test_it_requests_gpus_and_shows_the_cuda_line(
    app: Flask, ctx: Context, users: dict[str, TestUser]
) -> None:
    client = sign_in(app, users[ALICE])
    status, _ = post(client, "/allocations", gpu_type="4090", count="2", duration="2", unit="hours")
    assert status == 302
    html = client.get("/").get_data(as_text=True)
    assert export(0, 1) in html
    assert "You have GPU 0, 1 (4090)" in html
    assert "4090 — 2 of 4 free" in html
    assert sorted(a.gpu_id for a in active_of(ctx, ALICE)) == [0, 1]
    assert html.count(">access pending<") == 2  # no agent here to apply it
    with ctx.db.transaction() as session:
        for row in active_of(ctx, ALICE):
            allocations.mark_access_applied(session, row.id)
    assert "access pending" not in client.get("/").get_data(as_text=True)


def test_it_takes_days(app: Flask, ctx: Context, users: dict[str, TestUser]) -> None:
    client = sign_in(app, users[ALICE])
    status, _ = post(client, "/allocations", gpu_type="a100", count="1", duration="2", unit="days")
    assert status == 302
    (row,) = active_of(ctx, ALICE)
    assert round((row.expires_at - row.created_at).total_seconds()) == 48 * 3600


def test_it_shows_refusals_next_to_their_field(
    app: Flask, ctx: Context, users: dict[str, TestUser]
) -> None:
    client = sign_in(app, users[ALICE])
    status, html = post(client, "/allocations", gpu_type="4090", count="9", duration="1")
    assert status == 409
    assert re.search(r'id="count-error">not enough free 4090 GPUs: asked for 9, 4 free<', html)
    assert (
        'id="count" name="count" type="number" min="1" step="1" inputmode="numeric" value="9"'
        in html
    )
    status, html = post(client, "/allocations", gpu_type="4090", count="1", duration="300")
    assert status == 422
    assert re.search(r'id="duration-error">hours must be at most 168', html)
    status, html = post(client, "/allocations", gpu_type="4090", count="two", duration="1")
    assert status == 422 and 'id="count-error">Enter a whole number' in html
    assert active_of(ctx, ALICE) == []


def test_it_shows_a_lockout_and_refuses_to_allocate(
    app: Flask, ctx: Context, users: dict[str, TestUser]
) -> None:
    with ctx.db.transaction() as session:
        lockouts.lock_out(session, ctx.settings, ALICE, "used GPU 3 without holding it")
    client = sign_in(app, users[ALICE])
    html = client.get("/").get_data(as_text=True)
    assert "You are locked out until" in html and "used GPU 3 without holding it" in html
    status, html = post(client, "/allocations", gpu_type="4090", count="1", duration="1")
    assert status == 403 and "is locked out until" in html


def test_it_extends_and_releases(app: Flask, ctx: Context, users: dict[str, TestUser]) -> None:
    (row,) = allocations.request(ctx.db, ctx.settings, ALICE, "a100", 1, 1)
    client = sign_in(app, users[ALICE])
    status, _ = post(client, f"/allocations/{row.id}/extend", hours="2")
    assert status == 302
    (extended,) = active_of(ctx, ALICE)
    assert extended.expires_at > row.expires_at
    status, html = post(client, f"/allocations/{row.id}/extend", hours="500")
    assert status == 422 and f'id="extend-{row.id}-error"' in html
    status, _ = post(client, f"/allocations/{row.id}/release")
    assert status == 302
    assert active_of(ctx, ALICE) == []
    assert "Released GPU 4 (a100)." in client.get("/").get_data(as_text=True)


def test_it_does_not_let_a_user_release_another_users_gpu(
    app: Flask, ctx: Context, users: dict[str, TestUser]
) -> None:
    (row,) = allocations.request(ctx.db, ctx.settings, BOB, "4090", 1, 1)
    client = sign_in(app, users[ALICE])
    status, _ = post(client, f"/allocations/{row.id}/release")
    assert status == 302
    assert "no allocation" in client.get("/").get_data(as_text=True)
    assert [a.id for a in active_of(ctx, BOB)] == [row.id]


def test_it_shows_the_schedule_with_mine_marked(
    app: Flask, ctx: Context, users: dict[str, TestUser]
) -> None:
    allocations.request(ctx.db, ctx.settings, ALICE, "4090", 1, 1)
    allocations.request(ctx.db, ctx.settings, BOB, "a100", 1, 1)
    html = sign_in(app, users[ALICE]).get("/schedule").get_data(as_text=True)
    assert html.count('class="card gpu') == 6
    card0 = html[html.index('data-gpu="testhost/0"') : html.index('data-gpu="testhost/1"')]
    assert "yours" in card0 and "is-mine" not in card0  # the class sits before data-gpu
    card4 = html[html.index('data-gpu="testhost/4"') : html.index('data-gpu="testhost/5"')]
    assert "in use" in card4 and BOB in card4
    assert "vendor/uplot/uPlot.iife.min.js" in html and 'data-refresh="2.0"' in html


def test_the_schedule_groups_gpus_by_host_with_each_agents_health(
    app: Flask, ctx: Context, users: dict[str, TestUser]
) -> None:
    from datetime import timedelta

    from gpulocker.gpus import GpuInfo
    from gpulocker.inventory import TypedGpu, register
    from gpulocker.models import Heartbeat, utcnow

    with ctx.db.transaction() as session:
        register(session, "gpu-far", [TypedGpu(GpuInfo(0, "far", 0, "/dev/nvidia0", 1), "4090")])
        session.add(Heartbeat(name="agent:gpu-far", at=utcnow() - timedelta(seconds=600)))
    html = sign_in(app, users[ALICE]).get("/schedule").get_data(as_text=True)
    far = html.index('data-host-group="gpu-far"')
    here = html.index('data-host-group="testhost"')
    assert html.count("data-host-group=") == 2 and far < here
    assert "agent unreachable" in html[far:here] and 'data-gpu="gpu-far/0"' in html[far:here]
    assert html[here:].count('class="card gpu') == 6 and "agent unknown" in html[here:]
    assert 'id="gpu-grid"' in html  # schedule.js still finds every card


def test_it_escapes_scripts_in_notifications_and_admin_messages(
    app: Flask, ctx: Context, users: dict[str, TestUser]
) -> None:
    with ctx.db.transaction() as session:
        notify(session, ctx.settings, "admin_message", f"GPU note {SCRIPT}", users=[ALICE])
    admin = sign_in(app, users[ADMIN])
    status, _ = post(admin, "/admin/message", page="/admin/", user=ALICE, message=SCRIPT)
    assert status == 302
    status, _ = post(admin, "/admin/message", page="/admin/", user=SCRIPT, message="hello")
    assert status == 302
    html = sign_in(app, users[ALICE]).get("/notifications").get_data(as_text=True)
    assert SCRIPT not in html
    assert html.count(ESCAPED) == 2
    policy = sign_in(app, users[ALICE]).get("/notifications").headers["Content-Security-Policy"]
    assert "script-src 'self';" in policy and "unsafe-inline" not in policy.split(";")[1]
    assert (
        '<span class="count-badge" data-testid="unread-count" aria-label="2 unread">2</span>'
        in html
    )
    events_html = admin.get(f"/admin/events?user={SCRIPT}").get_data(as_text=True)
    assert SCRIPT not in events_html and ESCAPED in events_html


def test_it_marks_notifications_read(app: Flask, ctx: Context, users: dict[str, TestUser]) -> None:
    allocations.request(ctx.db, ctx.settings, ALICE, "4090", 1, 1)
    client = sign_in(app, users[ALICE])
    assert 'aria-label="1 unread"' in client.get("/").get_data(as_text=True)
    status, _ = post(client, "/notifications/read-all", page="/notifications")
    assert status == 302
    assert "unread" not in client.get("/").get_data(as_text=True).split("<main")[0]
    with ctx.db.session() as session:
        assert all(n.read_at for n in session.scalars(select(Notification)))


def test_it_renders_every_page_for_a_user_and_keeps_them_out_of_admin(
    app: Flask, users: dict[str, TestUser]
) -> None:
    client = sign_in(app, users[ALICE])
    titles = {
        "/": "Dashboard",
        "/schedule": "Schedule",
        "/disk": "Disk",
        "/notifications": "Notifications",
        "/settings": "Settings",
    }
    for path, title in titles.items():
        response = client.get(path)
        assert response.status_code == 200, path
        html = response.get_data(as_text=True)
        assert 'name="viewport"' in html
        assert f"<title>{title} · GPULocker</title>" in html, path
        assert html.count("<h1") == 1, path
    assert ">Admin<" not in client.get("/").get_data(as_text=True)
    for path in ("/admin/", "/admin/events", "/admin/disk", "/admin/reset"):
        assert client.get(path).status_code == 403, path
    status, _ = post(client, "/admin/maintenance", enabled="on")
    assert status == 403


def test_it_renders_every_admin_page(app: Flask, ctx: Context, users: dict[str, TestUser]) -> None:
    allocations.request(ctx.db, ctx.settings, BOB, "4090", 2, 1)
    client = sign_in(app, users[ADMIN])
    for path in ("/", "/schedule", "/admin/", "/admin/events", "/admin/disk", "/admin/reset"):
        assert client.get(path).status_code == 200, path
    html = client.get("/admin/").get_data(as_text=True)
    assert html.count("<tr data-allocation=") == 2 and "Nobody is locked out." in html


def test_it_lets_an_admin_allocate_for_a_user_and_release_it(
    app: Flask, ctx: Context, users: dict[str, TestUser]
) -> None:
    client = sign_in(app, users[ADMIN])
    status, html = post(
        client, "/admin/allocate", page="/admin/", user="", gpu_type="a100", count="1", duration="1"
    )
    assert status == 422 and 'id="user-error">Say which user gets the GPUs.' in html
    status, _ = post(
        client,
        "/admin/allocate",
        page="/admin/",
        user=BOB,
        gpu_type="a100",
        count="2",
        duration="1",
    )
    assert status == 302
    rows = active_of(ctx, BOB)
    assert sorted(r.gpu_id for r in rows) == [4, 5]
    status, _ = post(client, f"/admin/allocations/{rows[0].id}/release", page="/admin/")
    assert status == 302
    assert [r.gpu_id for r in active_of(ctx, BOB)] == [5]
    html = client.get("/admin/events?kind=released").get_data(as_text=True)
    assert f"of {BOB} released" in html


def test_it_lifts_a_lockout_and_switches_maintenance(
    app: Flask, ctx: Context, users: dict[str, TestUser]
) -> None:
    with ctx.db.transaction() as session:
        lockouts.lock_out(session, ctx.settings, BOB, "violation")
    client = sign_in(app, users[ADMIN])
    assert BOB in client.get("/admin/").get_data(as_text=True)
    status, _ = post(client, f"/admin/lockouts/{BOB}/lift", page="/admin/")
    assert status == 302
    with ctx.db.session() as session:
        assert lockouts.active(session, BOB) is None
    status, _ = post(client, "/admin/maintenance", page="/admin/", enabled="on", message="x")
    assert status == 302
    with ctx.db.session() as session:
        assert maintenance.enabled(session)
    alice = sign_in(app, users[ALICE])
    status, html = post(alice, "/allocations", gpu_type="4090", count="1", duration="1")
    assert status == 403 and "maintenance mode" in html


def test_it_resets_only_after_the_word_is_typed(
    app: Flask, ctx: Context, users: dict[str, TestUser]
) -> None:
    allocations.request(ctx.db, ctx.settings, BOB, "4090", 2, 1)
    client = sign_in(app, users[ADMIN])
    assert "This ends <strong>2</strong>" in client.get("/admin/reset").get_data(as_text=True)
    status, html = post(client, "/admin/reset", page="/admin/reset", confirm="yes")
    assert status == 422 and "Type &#34;reset&#34; to confirm." in html
    assert len(active_of(ctx, BOB)) == 2
    status, _ = post(client, "/admin/reset", page="/admin/reset", confirm="reset")
    assert status == 302
    assert active_of(ctx, BOB) == []


def test_it_pages_and_filters_the_events_log(
    app: Flask, ctx: Context, users: dict[str, TestUser]
) -> None:
    for _ in range(30):
        (row,) = allocations.request(ctx.db, ctx.settings, BOB, "a100", 1, 1)
        allocations.release(ctx.db, ctx.settings, BOB, row.id)
    client = sign_in(app, users[ADMIN])
    first = client.get(f"/admin/events?user={BOB}").get_data(as_text=True)
    assert first.count("<tr>") == 50 + 1  # a header row and a full page
    older = re.search(r'href="([^"]+)" rel="next"', first)
    assert older
    second = client.get(older.group(1).replace("&amp;", "&")).get_data(as_text=True)
    assert second.count("<tr>") == 10 + 1 and 'rel="next"' not in second
    kinds = client.get(f"/admin/events?user={BOB}&kind=granted&gpu=4").get_data(as_text=True)
    assert kinds.count(">granted</span>") == 30
    with ctx.db.session() as session:
        newest = max(session.scalars(select(Event.at)))
    later = (newest.replace(tzinfo=None)).strftime("%Y-%m-%dT%H:%M")
    nothing = client.get(f"/admin/events?since=2999-01-01T00:00&until={later}")
    assert "No events match." in nothing.get_data(as_text=True)


def test_it_signs_out_for_real(app: Flask, users: dict[str, TestUser]) -> None:
    client = sign_in(app, users[ALICE])
    status, _ = post(client, "/logout")
    assert status == 302
    assert client.get("/").status_code == 302


def test_it_shows_my_disk_usage_once_measured(
    app: Flask, ctx: Context, users: dict[str, TestUser]
) -> None:
    from gpulocker import disk

    client = sign_in(app, users[ALICE])
    first = client.get("/disk").get_data(as_text=True)
    assert "Measuring your home directory" in first and 'http-equiv="refresh"' in first
    assert disk.scan_pending(ctx) >= 1
    html = client.get("/disk").get_data(as_text=True)
    assert "Your home" in html and "Whole filesystem" in html and "Measured" in html
    assert users[ALICE].home in html and 'http-equiv="refresh"' not in html
    admin_html = sign_in(app, users[ADMIN]).get("/admin/disk").get_data(as_text=True)
    assert f"<strong>{ALICE}</strong>" in admin_html


def test_it_links_and_unlinks_telegram_from_the_settings_page(
    ctx: Context, pam_service: str, users: dict[str, TestUser]
) -> None:
    from gpulocker.models import UserProfile
    from gpulocker.notify import linking

    with_bot = Context(ctx.settings.with_overrides(telegram_bot_token="123:bot"))
    app = create_app(ctx=with_bot)
    app.config.update(TESTING=True)
    client = sign_in(app, users[ALICE])
    assert "Link Telegram" in client.get("/settings").get_data(as_text=True)
    status, _ = post(client, "/settings/telegram/link", page="/settings")
    assert status == 302
    code = linking.link_status(ctx.db, ALICE)["code"]
    assert code and f"/start {code}" in client.get("/settings").get_data(as_text=True)
    with ctx.db.transaction() as session:  # what the agent does when the bot gets the code
        profile = session.get(UserProfile, ALICE)
        assert profile is not None
        profile.telegram_chat_id, profile.telegram_link_code = "4242", None
    html = client.get("/settings").get_data(as_text=True)
    assert "<code>4242</code>" in html and "Unlink Telegram" in html
    status, _ = post(client, "/settings/telegram/unlink", page="/settings")
    assert status == 302
    assert not linking.link_status(ctx.db, ALICE)["linked"]
    with_bot.close()


def test_it_creates_shows_once_and_revokes_an_api_token(
    app: Flask, ctx: Context, users: dict[str, TestUser]
) -> None:
    from gpulocker import tokens

    client = sign_in(app, users[ALICE])
    assert "No API tokens." in client.get("/settings").get_data(as_text=True)
    status, html = post(client, "/settings/tokens", page="/settings", name="laptop")
    assert status == 200 and "Copy it now" in html
    raw = re.search(r'<code id="new-token">([^<]+)</code>', html)
    assert raw and tokens.authenticate(ctx.db, raw.group(1)) is not None
    listed = client.get("/settings").get_data(as_text=True)
    assert "<strong>laptop</strong>" in listed and raw.group(1) not in listed
    with ctx.db.session() as session:
        (row,) = tokens.list_for(session, ALICE)
    status, _ = post(client, f"/settings/tokens/{row.id}/revoke", page="/settings")
    assert status == 302
    assert tokens.authenticate(ctx.db, raw.group(1)) is None


class _Controls(HTMLParser):
    """Collects form controls and the ids that <label for=...> points at."""

    def __init__(self) -> None:
        super().__init__()
        self.controls: list[dict[str, str | None]] = []
        self.labelled: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "label" and found.get("for"):
            self.labelled.add(str(found["for"]))
        if tag in ("input", "select", "textarea") and found.get("type") != "hidden":
            self.controls.append(found)


def test_it_labels_every_form_control(app: Flask, ctx: Context, users: dict[str, TestUser]) -> None:
    allocations.request(ctx.db, ctx.settings, ADMIN, "4090", 1, 1)
    client = sign_in(app, users[ADMIN])
    pages = ("/", "/settings", "/admin/", "/admin/events", "/admin/reset")
    for path in pages:
        parser = _Controls()
        parser.feed(client.get(path).get_data(as_text=True))
        assert parser.controls, path
        for control in parser.controls:
            named = control.get("aria-label") or control.get("id") in parser.labelled
            assert named, f"{path}: a control without a label: {control}"


def test_it_answers_an_unknown_page_with_a_page_and_the_api_with_json(
    app: Flask, users: dict[str, TestUser]
) -> None:
    client = sign_in(app, users[ALICE])
    page = client.get("/no-such-page")
    assert page.status_code == 404 and "There is no such page." in page.get_data(as_text=True)
    api = client.get("/api/v1/no-such-thing")
    assert api.status_code == 404 and api.get_json()["error"]["code"] == "not_found"


# --- hostile input: a clear 4xx, never a 500, nothing written -----------------------------

HOSTILE_NEXT = (
    "/%09/evil.com",  # browsers drop the tab: //evil.com
    "/%0a/x",  # a newline in the Location header
    "/%0d%0aSet-Cookie:x=1",
    "//evil.com",
    "/%5Cevil.com",  # a backslash reads as a slash
    "https://evil.com/",
    "javascript:alert(1)",
    "evil.com",
)


def test_it_follows_only_same_site_next_targets(
    app: Flask, ctx: Context, users: dict[str, TestUser]
) -> None:
    for target in HOSTILE_NEXT:
        client = app.test_client()
        token = csrf_of(client.get(f"/login?next={target}").get_data(as_text=True))
        response = client.post(
            f"/login?next={target}",
            data={"username": ALICE, "password": users[ALICE].password, "csrf_token": token},
        )
        assert (response.status_code, response.headers["Location"]) == (302, "/"), target
        signed_in = client.get(f"/login?next={target}")
        assert (signed_in.status_code, signed_in.headers["Location"]) == (302, "/"), target
    kept = client.get("/login?next=/schedule%3Fx%3D1")
    assert kept.headers["Location"] == "/schedule?x=1"
    (row,) = allocations.request(ctx.db, ctx.settings, ALICE, "4090", 1, 1)
    token = csrf_of(client.get("/").get_data(as_text=True))
    response = client.post(
        f"/allocations/{row.id}/release", data={"next": "/\t/evil.com", "csrf_token": token}
    )
    assert (response.status_code, response.headers["Location"]) == (302, "/")
    assert active_of(ctx, ALICE) == []


BIG = "99999999999999999999999"
TOO_BIG = (BIG, str(2**31))


def test_it_answers_ids_no_row_can_have_with_not_found(
    app: Flask, ctx: Context, users: dict[str, TestUser]
) -> None:
    (row,) = allocations.request(ctx.db, ctx.settings, ALICE, "4090", 1, 1)
    client = sign_in(app, users[ADMIN])
    token = csrf_of(client.get("/").get_data(as_text=True))
    for big in TOO_BIG:
        for path in (
            f"/allocations/{big}/release",
            f"/allocations/{big}/extend",
            f"/notifications/{big}/read",
            f"/settings/tokens/{big}/revoke",
            f"/admin/allocations/{big}/release",
        ):
            response = client.post(path, data={"hours": "1", "csrf_token": token})
            assert response.status_code == 404, path
            assert "There is no such" in response.get_data(as_text=True), path
    assert [a.id for a in active_of(ctx, ALICE)] == [row.id]


def test_it_refuses_query_numbers_out_of_range(
    app: Flask, ctx: Context, users: dict[str, TestUser]
) -> None:
    allocations.request(ctx.db, ctx.settings, ALICE, "4090", 1, 1)
    client = sign_in(app, users[ADMIN])
    for query in ("/notifications?before=", "/admin/events?gpu=", "/admin/events?before="):
        for bad in (*TOO_BIG, "-1", "abc"):
            response = client.get(query + bad)
            assert response.status_code == 422, query + bad
            assert "enter a whole number from 0 to 2147483647" in response.get_data(as_text=True)
        assert client.get(query + str(2**31 - 1)).status_code == 200, query
        assert client.get(query).status_code == 200, query
    granted = client.get("/admin/events?gpu=0&kind=granted").get_data(as_text=True)
    assert granted.count(">granted</span>") == 1


def test_it_refuses_nul_characters_without_storing_anything(
    app: Flask, ctx: Context, users: dict[str, TestUser]
) -> None:
    from gpulocker import tokens

    anonymous = app.test_client()
    token = csrf_of(anonymous.get("/login").get_data(as_text=True))
    response = anonymous.post(
        "/login", data={"username": f"{ALICE}\x00", "password": "x", "csrf_token": token}
    )
    assert response.status_code == 422
    assert "must not contain NUL characters" in response.get_data(as_text=True)
    assert "<h1>That did not work</h1>" in response.get_data(as_text=True)
    admin = sign_in(app, users[ADMIN])
    for query in ("kind=%00", "user=a%00", "since=%00", "a%00=1"):
        response = admin.get(f"/admin/events?{query}")
        assert response.status_code == 422, query
        assert "must not contain NUL characters" in response.get_data(as_text=True)
    with ctx.db.session() as session:
        before = session.scalar(select(func.count()).select_from(Event))
    for message in ({"user": BOB, "message": "hi\x00"}, {"user": f"{BOB}\x00", "message": "hi"}):
        status, html = post(admin, "/admin/message", page="/admin/", **message)
        assert status == 422 and "must not contain NUL characters" in html
    status, _ = post(admin, "/admin/lockouts/a%00/lift", page="/admin/")
    assert status == 422
    status, _ = post(admin, "/settings/tokens", page="/settings", name="lap\x00top")
    assert status == 422
    with ctx.db.session() as session:
        assert session.scalar(select(func.count()).select_from(Event)) == before
        assert session.scalars(select(Notification).where(Notification.user == BOB)).all() == []
        assert tokens.list_for(session, ADMIN) == []


def test_it_keeps_only_the_filters_in_the_events_log_links(
    app: Flask, ctx: Context, users: dict[str, TestUser]
) -> None:
    allocations.request(ctx.db, ctx.settings, BOB, "a100", 1, 1)
    client = sign_in(app, users[ADMIN])
    hostile = "endpoint=x&_external=1&_scheme=https&_anchor=a&_method=POST&extra=1"
    response = client.get(f"/admin/events?{hostile}&user={BOB}&kind=granted&before=2147483647")
    html = response.get_data(as_text=True)
    assert response.status_code == 200 and html.count(">granted</span>") == 1
    links = re.findall(r'href="(/admin/events[^"]*)"', html)
    newest = f"/admin/events?user={BOB}&amp;kind=granted"
    assert newest in links
    assert not [link for link in links if re.search(r"endpoint|extra|before|=1|#", link)]
    assert "http://" not in html and "https://" not in html
