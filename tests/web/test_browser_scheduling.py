# ruff: noqa: F811  (the fixtures of test_browser are imported, then used as arguments)
"""The pages of SPEC section 11 in a real browser (headless Chromium through Playwright)
against the real product (`gpulocker serve --simulate`, its agent running the scheduler):
the dashboard's place in line moving without a reload when the head of the line is
cancelled or granted, the calendar drawing an allocation and bookings, a booking made
through its form included, and the calendar following a grant made elsewhere."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from playwright.sync_api import Page, expect

from gpulocker.models import utcnow
from tests.helpers import ADMIN, ALICE, BOB, CAROL, TestUser
from tests.web.test_browser import (  # noqa: F401
    Server,
    browser,
    new_page,
    request_gpus,
    server,
    sign_in,
)

pytestmark = [pytest.mark.browser, pytest.mark.root, pytest.mark.timeout(300)]

FORM_TIME = "%Y-%m-%dT%H:%M"


def watch_errors(page: Page) -> list[str]:
    """Script errors and whatever the security policy blocked, as they happen."""
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    return problems


def wait_in_line(page: Page, gpu_type: str) -> None:
    page.get_by_label("GPU type").select_option(gpu_type)
    page.get_by_label("How many").fill("1")
    page.get_by_label("For how long").fill("1")
    page.get_by_label("Wait in line if none are free").check()
    page.get_by_role("button", name="Request").click()
    expect(page.get_by_role("status").filter(has_text="waits in line")).to_be_visible()


def place_of(page: Page) -> object:
    """The place in line of the (only) waiting request on this dashboard."""
    return page.get_by_test_id("my-requests").locator('[data-field="position"]')


def test_the_place_in_line_moves_live_as_the_head_is_cancelled_and_granted(
    server: Server, new_page: object, users: dict[str, TestUser]
) -> None:
    admin = new_page()  # type: ignore[operator]
    sign_in(admin, server, users[ADMIN])
    request_gpus(admin, "a100", 2, 1)
    expect(admin.get_by_test_id("my-allocations").locator("tbody tr")).to_have_count(2)

    pages = {}
    for name in (ALICE, BOB, CAROL):
        page = new_page()  # type: ignore[operator]
        sign_in(page, server, users[name])
        wait_in_line(page, "a100")
        pages[name] = page
    carol = pages[CAROL]
    problems = watch_errors(carol)
    carol.reload()
    expect(place_of(carol)).to_have_text("3")
    carol.evaluate("window.__sameDocument = true")

    alice = pages[ALICE]
    alice.get_by_role("button", name="Cancel request").click()
    expect(alice.get_by_text("cancelled: you are out of the line")).to_be_visible()
    expect(place_of(carol)).to_have_text("2")  # no reload: queue.js asked the API

    bob = pages[BOB]
    bob.evaluate("window.__sameDocument = true")
    expect(place_of(bob)).to_have_text("1")
    admin.get_by_role("button", name="Release GPU 4").click()  # the agent grants bob
    expect(bob.get_by_test_id("my-requests").locator('[data-field="state"]')).to_have_text(
        "granted", timeout=20000
    )
    expect(bob.get_by_role("link", name="Show my GPUs")).to_be_visible()
    expect(place_of(carol)).to_have_text("1", timeout=20000)
    expect(carol.locator("[data-queue-live-text]")).to_contain_text("updated")
    assert carol.evaluate("window.__sameDocument === true"), "carol's page was reloaded"
    assert bob.evaluate("window.__sameDocument === true"), "bob's page was reloaded"
    bob.get_by_role("link", name="Show my GPUs").click()
    expect(bob.get_by_test_id("my-allocations").locator("tbody tr")).to_have_count(1)
    carol.get_by_role("button", name="Cancel request").click()
    expect(carol.get_by_text("You are not waiting for GPUs.")).to_be_visible()
    assert problems == [], problems


def test_the_calendar_draws_an_allocation_and_a_booking_made_through_its_form(
    server: Server, new_page: object, users: dict[str, TestUser]
) -> None:
    page = new_page()  # type: ignore[operator]
    problems = watch_errors(page)
    sign_in(page, server, users[ALICE])
    request_gpus(page, "4090", 1, 2)
    expect(page.locator("#cuda-line")).to_be_visible()
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Calendar").click()
    expect(page.get_by_role("heading", name="Calendar", exact=True)).to_be_visible()
    mine = page.locator('[data-calendar="4090"] .cal-bar--allocation.is-mine')
    expect(mine).to_have_count(1)
    expect(mine).to_have_attribute("title", re.compile(r"^in use by you, .* UTC$"))

    day = (utcnow() + timedelta(days=1)).replace(hour=9, minute=0, second=0, microsecond=0)
    page.get_by_label("GPU type", exact=True).select_option("a100")
    page.get_by_label("How many").fill("2")
    page.get_by_label("From (UTC)").fill(day.strftime(FORM_TIME))
    page.get_by_label("Until (UTC)").fill((day + timedelta(hours=6)).strftime(FORM_TIME))
    page.get_by_role("button", name="Book", exact=True).click()
    expect(page.get_by_role("status").filter(has_text="Booked 2 a100 GPU(s)")).to_be_visible()
    booked = page.locator('[data-calendar="a100"] .cal-bar--reservation.is-mine')
    expect(booked).to_have_count(2)  # one bar on each GPU it holds
    expect(booked.first.locator(".cal-bar-text")).to_contain_text("you · booked #")
    expect(page.get_by_test_id("bookings").locator("tbody tr")).to_have_count(1)

    # the same window again does not fit: said next to the start, nothing typed lost
    page.get_by_label("GPU type", exact=True).select_option("a100")
    page.get_by_label("How many").fill("1")
    page.get_by_label("From (UTC)").fill((day + timedelta(hours=1)).strftime(FORM_TIME))
    page.get_by_label("Until (UTC)").fill((day + timedelta(hours=3)).strftime(FORM_TIME))
    page.get_by_role("button", name="Book", exact=True).click()
    expect(page.locator("#start-error")).to_contain_text("the earliest start that fits is")
    expect(page.get_by_label("From (UTC)")).to_have_value(
        (day + timedelta(hours=1)).strftime(FORM_TIME)
    )
    expect(page.get_by_label("How many")).to_have_value("1")
    page.get_by_role("button", name="instead").click()
    expect(page.get_by_test_id("bookings").locator("tbody tr")).to_have_count(2)
    expect(page.locator('[data-calendar="a100"] .cal-bar--reservation.is-mine')).to_have_count(3)

    other = new_page(390, 844)  # type: ignore[operator]
    sign_in(other, server, users[BOB])
    other.goto(server.url + "/calendar")
    theirs = other.locator('[data-calendar="a100"] .cal-bar--reservation')
    expect(theirs).to_have_count(3)
    assert "booked for someone" in (theirs.first.get_attribute("title") or "")
    width = other.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the calendar is {width} px wide on a 390 px phone"
    refused = "Failed to load resource: the server responded with a status of 409 (CONFLICT)"
    assert problems == [refused], problems  # the refused booking's page; nothing else


def test_the_calendar_follows_a_grant_made_elsewhere_and_keeps_what_is_typed(
    server: Server, new_page: object, users: dict[str, TestUser]
) -> None:
    page = new_page()  # type: ignore[operator]
    problems = watch_errors(page)
    sign_in(page, server, users[CAROL])
    page.goto(server.url + "/calendar")
    page.evaluate("window.__sameDocument = true")
    bars = page.locator('[data-calendar="4090"] .cal-bar--allocation')
    before = bars.count()
    page.get_by_label("How many").fill("3")  # typed, not sent

    other = new_page()  # type: ignore[operator]
    sign_in(other, server, users[BOB])
    request_gpus(other, "4090", 1, 1)
    expect(other.locator("#cuda-line")).to_be_visible()

    expect(bars).to_have_count(before + 1, timeout=20000)  # calendar.js fetched it
    expect(page.locator("[data-cal-live-text]")).to_contain_text("updated")
    assert page.evaluate("window.__sameDocument === true"), "the calendar was reloaded"
    expect(page.get_by_label("How many")).to_have_value("3")
    assert problems == [], problems
