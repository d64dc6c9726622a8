"""The scheduling operations every surface maps to: queue view, calendar, me."""

from __future__ import annotations

from datetime import timedelta

import pytest

from gpulocker import scheduling_ops as ops
from gpulocker.context import Context
from gpulocker.errors import Invalid
from gpulocker.models import utcnow
from tests.helpers import ADMIN, ALICE, BOB, CAROL


def test_wait_queue_names_calendar_and_me(ctx: Context) -> None:
    ops.request(ctx, CAROL, "a100", 2, 3)
    mine = ops.request(ctx, ALICE, "a100", 1, 1, wait=True)["request"]
    theirs = ops.request(ctx, BOB, "a100", 1, 1, wait=True)["request"]
    assert mine["state"] == "waiting" and mine["position"] == 1 and theirs["position"] == 2
    seen = ops.queue_view(ctx, ALICE)["queue"]
    assert [e["user"] for e in seen] == [ALICE, None] and seen[0]["mine"]
    assert [e["user"] for e in ops.queue_view(ctx, ADMIN)["queue"]] == [ALICE, BOB]
    start = (utcnow() + timedelta(hours=4)).isoformat()
    booked = ops.book(ctx, BOB, "a100", 1, start, 2)["reservation"]
    assert booked["state"] == "booked"
    with pytest.raises(Invalid, match="ISO 8601"):
        ops.book(ctx, BOB, "a100", 1, "tomorrow", 2)
    cal = ops.calendar(ctx, ALICE, "a100", 2)
    items = [i for g in cal["gpus"] for i in g["items"]]
    assert {i["kind"] for i in items} == {"allocation", "reservation"}
    assert all(i["user"] is None for i in items)  # neither is hers
    assert any(
        i["user"] == BOB for g in ops.calendar(ctx, BOB, "a100", 2)["gpus"] for i in g["items"]
    )
    with pytest.raises(Invalid, match="days"):
        ops.calendar(ctx, ALICE, "a100", 90)
    assert ops.reservation_cancel(ctx, BOB, booked["id"])["reservation"]["state"] == "cancelled"
    assert ops.request_cancel(ctx, ALICE, mine["id"])["request"]["state"] == "cancelled"
    me = ops.me(ctx, CAROL)
    assert me["usage"]["gpus"] == 2 and me["usage"]["gpu_hours_week"] == pytest.approx(6, abs=0.01)
    assert me["limits"] == {"gpu_hours_per_week": None, "max_gpus": None}
