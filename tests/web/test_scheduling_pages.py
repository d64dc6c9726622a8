# ruff: noqa: F811  (the app fixture of test_pages is imported, then used as an argument)
"""The pages of SPEC section 11 through Flask's test client (real PAM sign-in, both
databases): waiting in line from the dashboard with its place and a cancel button, my
bookings, the calendar's drawing, its booking form's refusals next to their fields with
nothing typed lost, admins seeing and cancelling every booking, and CSRF on every form."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest
from flask import Flask

from gpulocker import allocations, queue, reservations
from gpulocker.context import Context
from gpulocker.models import BOOKED, CANCELLED, WAITING, utcnow
from gpulocker.web import calendar_layout
from tests.helpers import ADMIN, ALICE, BOB, CAROL, TestUser
from tests.web.test_pages import _Controls, app, csrf_of, post, sign_in  # noqa: F401

pytestmark = pytest.mark.root

FORM_TIME = "%Y-%m-%dT%H:%M"


def tomorrow(hour: int) -> datetime:
    day = utcnow() + timedelta(days=1)
    return day.replace(hour=hour, minute=0, second=0, microsecond=0)


def bars(html: str, section: str) -> list[dict[str, str]]:
    """The bars drawn in one GPU type's section: kind, id, title, style, text."""
    start = html.index(f'data-calendar="{section}"')
    end = html.find("<section", start + 1)
    part = html[start : end if end > 0 else len(html)]
    found = re.finditer(
        r'<div role="listitem" class="cal-bar cal-bar--(\w+)( is-mine)?" style="([^"]+)" '
        r'title="([^"]+)" data-kind="\w+"(?: data-id="(\d+)")?>\s*'
        r'<span class="cal-bar-text"(?: hidden)?>([^<]*)</span>',
        part,
    )
    return [
        {
            "kind": m[1],
            "mine": bool(m[2]),
            "style": m[3],
            "title": m[4],
            "id": m[5] or "",
            "text": m[6],
        }
        for m in found
    ]


def booking_form(**fields: str) -> dict[str, str]:
    base = {
        "gpu_type": "a100",
        "count": "1",
        "start": tomorrow(9).strftime(FORM_TIME),
        "end": tomorrow(17).strftime(FORM_TIME),
    }
    return {**base, **fields}


# --- the dashboard ----------------------------------------------------------------------


def test_the_dashboard_waits_in_line_shows_the_place_and_cancels(
    app: Flask, ctx: Context, users: dict[str, TestUser]
) -> None:
    allocations.request(ctx.db, ctx.settings, CAROL, "a100", 2, 2)
    queue.submit(ctx.db, ctx.settings, BOB, "a100", 1, 1)  # ahead of alice
    client = sign_in(app, users[ALICE])
    status, html = post(client, "/allocations", gpu_type="a100", count="1", duration="1")
    assert status == 409 and 'id="count-error">not enough free a100 GPUs' in html
    assert 'id="wait" name="wait" type="checkbox" value="1" ' in html
    status, html = post(client, "/allocations", gpu_type="a100", count="1", duration="1", wait="1")
    assert status == 302
    (mine,) = queue.list_for(ctx.db, ctx.settings, ALICE)
    assert mine.state == WAITING
    html = client.get("/").get_data(as_text=True)
    assert f"request {mine.id} waits in line (place 2)" in html
    row = re.search(rf'<tr data-request="{mine.id}" data-state="waiting">.*?</tr>', html, re.S)
    assert row, html
    assert re.search(r'data-field="position">2</strong>', row[0])
    assert "1 \u00d7 a100 for 1 h" in row[0]
    assert f'action="/requests/{mine.id}/cancel"' in row[0]
    assert 'id="queue-row-template"' in html and "/static/queue.js" in html
    assert 'data-requests-url="/api/v1/requests"' in html
    # bob cannot cancel alice's; alice can, once
    bob = sign_in(app, users[BOB])
    post(bob, f"/requests/{mine.id}/cancel")
    assert queue.get(ctx.db, ctx.settings, ALICE, mine.id).state == WAITING
    status, _ = post(client, f"/requests/{mine.id}/cancel", next="/")
    assert status == 302
    assert queue.get(ctx.db, ctx.settings, ALICE, mine.id).state == CANCELLED
    html = client.get("/").get_data(as_text=True)
    assert f"Request {mine.id} cancelled: you are out of the line." in html
    assert f'data-request="{mine.id}"' not in html
    post(client, f"/requests/{mine.id}/cancel")
    assert "only waiting ones cancel" in client.get("/").get_data(as_text=True)


def test_the_dashboard_wait_box_takes_free_gpus_at_once(
    app: Flask, ctx: Context, users: dict[str, TestUser]
) -> None:
    client = sign_in(app, users[ALICE])
    status, _ = post(client, "/allocations", gpu_type="4090", count="2", duration="1", wait="1")
    assert status == 302
    assert "You have GPU 0, 1 (4090)" in client.get("/").get_data(as_text=True)
    assert queue.list_for(ctx.db, ctx.settings, ALICE) == []


def test_the_dashboard_lists_my_bookings_and_cancels_one(
    app: Flask, ctx: Context, users: dict[str, TestUser]
) -> None:
    mine = reservations.book(ctx.db, ctx.settings, ALICE, "a100", 2, tomorrow(9), 3)
    reservations.book(ctx.db, ctx.settings, BOB, "4090", 1, tomorrow(9), 3)
    client = sign_in(app, users[ALICE])
    html = client.get("/").get_data(as_text=True)
    table = html[html.index('data-testid="my-bookings"') :]
    table = table[: table.index("</table>")]
    assert table.count("<tr data-booking=") == 1 and "2 \u00d7 a100" in table
    assert tomorrow(9).strftime("%a %d %b %H:%M") + " \u2192 12:00" in table  # one day
    status, _ = post(client, f"/bookings/{mine.id}/cancel", next="/")
    assert status == 302
    assert reservations.get(ctx.db, ctx.settings, ALICE, mine.id).state == CANCELLED
    html = client.get("/").get_data(as_text=True)
    assert f"Booking {mine.id} cancelled." in html and "No bookings." in html


# --- the calendar -----------------------------------------------------------------------


def test_the_calendar_draws_allocations_bookings_and_free_gaps(
    app: Flask, ctx: Context, users: dict[str, TestUser]
) -> None:
    (held,) = allocations.request(ctx.db, ctx.settings, ALICE, "a100", 1, 12)
    theirs = reservations.book(ctx.db, ctx.settings, BOB, "a100", 2, tomorrow(9), 8)
    client = sign_in(app, users[ALICE])
    response = client.get("/calendar")
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    assert "<title>Calendar · GPULocker</title>" in html
    assert 'href="/calendar" aria-current="page">Calendar</a>' in html
    assert 'data-calendar="4090"' in html and 'data-calendar="a100"' in html
    drawn = bars(html, "a100")
    alloc = [b for b in drawn if b["kind"] == "allocation"]
    booked = [b for b in drawn if b["kind"] == "reservation"]
    assert len(alloc) == 1 and alloc[0]["mine"] and alloc[0]["text"] == "you"
    assert alloc[0]["style"].startswith("left: 0.000%; width: 7.1")  # 12 h of 7 days
    assert held.expires_at.strftime("%a %d %b %H:%M") in alloc[0]["title"]
    assert len(booked) == 2  # one bar per GPU it holds
    assert all(b["text"] == "someone" and b["id"] == "" for b in booked)  # not her booking
    assert all("booked for someone" in b["title"] for b in booked)
    assert BOB not in html
    free = [b for b in drawn if b["kind"] == "free"]
    assert len(free) == 4 and all(b["text"] == "free" for b in free)  # around each booking
    assert [b["kind"] for b in bars(html, "4090")] == ["free"] * 4
    only = client.get("/calendar?gpu_type=a100&days=3").get_data(as_text=True)
    assert 'data-calendar="4090"' not in only and 'aria-current="page">3 days<' in only
    admin = sign_in(app, users[ADMIN]).get("/calendar?gpu_type=a100").get_data(as_text=True)
    seen = [b for b in bars(admin, "a100") if b["kind"] == "reservation"]
    assert {b["text"] for b in seen} == {f"{BOB} · booked #{theirs.id}"}


def test_the_booking_form_books_and_refuses_next_to_the_field_keeping_what_was_typed(
    app: Flask, ctx: Context, users: dict[str, TestUser]
) -> None:
    client = sign_in(app, users[ALICE])
    page = "/calendar"

    def book(**fields: str) -> tuple[int, str]:
        return post(client, "/calendar/book", page, **booking_form(**fields))

    status, html = book(start="", count="2")
    assert status == 422 and 'id="start-error">Enter the start as a date and a time' in html
    assert (
        'id="book-count" name="count" type="number" min="1" step="1" inputmode="numeric" value="2"'
        in html
    )
    status, html = book(end=tomorrow(8).strftime(FORM_TIME))
    assert status == 422 and 'id="end-error">The end must come after the start.' in html
    assert f'value="{tomorrow(8).strftime(FORM_TIME)}"' in html
    yesterday = (utcnow() - timedelta(days=1)).strftime(FORM_TIME)
    status, html = book(start=yesterday)
    assert status == 422 and 'id="start-error">start must not be in the past' in html
    assert f'value="{yesterday}"' in html
    status, html = book(end=(tomorrow(9) + timedelta(days=8)).strftime(FORM_TIME))
    assert status == 422 and 'id="end-error">The booking is too long or too short' in html
    status, html = book(count="lots")
    assert status == 422 and 'id="count-error">Enter a whole number' in html
    assert reservations.list_for(ctx.db, ctx.settings, ALICE) == []

    reservations.book(ctx.db, ctx.settings, BOB, "a100", 2, tomorrow(9), 8)
    status, html = book(
        start=tomorrow(10).strftime(FORM_TIME), end=tomorrow(12).strftime(FORM_TIME)
    )
    assert status == 409
    assert re.search(
        r'id="start-error">1 a100 GPU\(s\) on one host are not free for the whole '
        r"window; the earliest start that fits is ",
        html,
    )
    assert f'value="{tomorrow(10).strftime(FORM_TIME)}"' in html  # as typed
    instead = f"Book from {tomorrow(17).strftime('%Y-%m-%d %H:%M')} to {tomorrow(19).strftime('%Y-%m-%d %H:%M')} instead"
    assert instead in html
    form = html[html.index('class="instead"') :]
    hidden = dict(
        re.findall(
            r'<input type="hidden" name="(\w+)" value="([^"]*)">', form[: form.index("</form>")]
        )
    )
    assert hidden["start"] == tomorrow(17).strftime(FORM_TIME)
    status, _ = post(
        client, "/calendar/book", page, **{k: v for k, v in hidden.items() if k != "csrf_token"}
    )
    assert status == 302
    (row,) = reservations.list_for(ctx.db, ctx.settings, ALICE)
    assert (row.start_at, row.end_at) == (tomorrow(17), tomorrow(19))
    html = client.get(page).get_data(as_text=True)
    assert f"(booking {row.id})." in html and f'<tr data-booking="{row.id}">' in html
    assert 'id="book-user"' not in html  # only admins book for others
    status, html = book(
        user=BOB, start=tomorrow(20).strftime(FORM_TIME), end=tomorrow(21).strftime(FORM_TIME)
    )
    assert status == 403 and "only admins can book GPUs for another user" in html


def test_admins_see_and_cancel_every_booking_users_only_their_own(
    app: Flask, ctx: Context, users: dict[str, TestUser]
) -> None:
    alices = reservations.book(ctx.db, ctx.settings, ALICE, "4090", 1, tomorrow(9), 2)
    bobs = reservations.book(ctx.db, ctx.settings, BOB, "a100", 1, tomorrow(9), 2)
    alice = sign_in(app, users[ALICE])
    html = alice.get("/calendar").get_data(as_text=True)
    assert "My bookings" in html and html.count("<tr data-booking=") == 1
    post(alice, f"/bookings/{bobs.id}/cancel", "/calendar")
    assert f"no reservation {bobs.id}" in alice.get("/calendar").get_data(as_text=True)
    assert reservations.get(ctx.db, ctx.settings, BOB, bobs.id).state == BOOKED

    admin = sign_in(app, users[ADMIN])
    html = admin.get("/calendar").get_data(as_text=True)
    assert "Everyone&#39;s bookings" in html and html.count("<tr data-booking=") == 2
    assert f'aria-label="Cancel booking {bobs.id} of {BOB}"' in html
    status, _ = post(admin, f"/bookings/{bobs.id}/cancel", "/calendar", next="/calendar?days=3")
    assert status == 302
    assert reservations.get(ctx.db, ctx.settings, BOB, bobs.id).state == CANCELLED
    assert f"Booking {bobs.id} of {BOB} cancelled." in admin.get("/calendar").get_data(as_text=True)
    status, _ = post(admin, "/calendar/book", "/calendar", **booking_form(user=CAROL))
    assert status == 302
    (carols,) = reservations.list_for(ctx.db, ctx.settings, CAROL)
    assert carols.booked_by == ADMIN and alices.state == BOOKED


def test_every_scheduling_form_needs_the_csrf_token_and_is_labelled(
    app: Flask, ctx: Context, users: dict[str, TestUser]
) -> None:
    row = queue.submit(ctx.db, ctx.settings, ADMIN, "a100", 1, 1)
    booked = reservations.book(ctx.db, ctx.settings, ADMIN, "a100", 1, tomorrow(9), 2)
    client = sign_in(app, users[ADMIN])
    for path, data in (
        ("/calendar/book", booking_form()),
        (f"/requests/{row.id}/cancel", {}),
        (f"/bookings/{booked.id}/cancel", {}),
    ):
        for token in ({}, {"csrf_token": "forged"}):
            response = client.post(path, data={**data, **token})
            assert response.status_code == 403, path
    assert len(reservations.list_for(ctx.db, ctx.settings, ADMIN)) == 1
    assert queue.get(ctx.db, ctx.settings, ADMIN, row.id).state == WAITING
    for path in ("/", "/calendar"):
        parser = _Controls()
        parser.feed(client.get(path).get_data(as_text=True))
        for control in parser.controls:
            named = control.get("aria-label") or control.get("id") in parser.labelled
            assert named, f"{path}: a control without a label: {control}"


# --- the layout, alone ------------------------------------------------------------------


def test_the_layout_places_bars_in_percent_with_the_gaps_between() -> None:
    start = datetime(2026, 3, 2, 6, 0, tzinfo=UTC)  # a Monday
    answer = {
        "from": start.isoformat(),
        "until": (start + timedelta(days=2)).isoformat(),
        "gpus": [
            {
                "host": "h",
                "gpu_id": 0,
                "items": [
                    {
                        "kind": "allocation",
                        "start": start.isoformat(),
                        "end": (start - timedelta(minutes=5)).isoformat(),
                        "user": None,
                        "id": None,
                        "mine": False,
                    },
                    {
                        "kind": "reservation",
                        "start": (start + timedelta(hours=12)).isoformat(),
                        "end": (start + timedelta(days=3)).isoformat(),
                        "user": "bob",
                        "id": 7,
                        "mine": False,
                    },
                ],
            }
        ],
    }
    (lane,), ticks = calendar_layout.layout(answer)
    kinds = [(s.kind, round(s.left, 2), round(s.width, 2)) for s in lane.segments]
    # an allocation in its grace still shows; the booking is cut at the window's end
    assert kinds == [("allocation", 0.0, 0.4), ("free", 0.0, 25.0), ("reservation", 25.0, 75.0)]
    assert lane.segments[2].text == "bob · booked #7" and lane.segments[2].labelled
    assert "Mon 02 Mar 18:00 to Wed 04 Mar 06:00 UTC" in lane.segments[2].title
    assert [t.label for t in ticks][:3] == ["09:00", "12:00", "15:00"]
    assert [t.label for t in ticks if t.major] == ["Tue 03 Mar", "Wed 04 Mar"]
    assert ticks[0].left == pytest.approx(6.25)


def test_a_poll_of_the_api_never_sends_the_session_cookie_back(
    app: Flask, users: dict[str, TestUser]
) -> None:
    """A poll answered after a form's redirect must not put back the session it read
    (which would drop the form's flash message)."""
    client = sign_in(app, users[ALICE])
    for path in ("/api/v1/requests", "/api/gpu_status", "/"):
        response = client.get(path)
        assert response.status_code == 200, path
        assert "Set-Cookie" not in response.headers, path
    status, _ = post(client, "/allocations", gpu_type="4090", count="1", duration="1")
    assert status == 302
    assert "You have GPU 0 (4090)" in client.get("/").get_data(as_text=True)
