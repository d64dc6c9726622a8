"""The scheduling operations as every surface offers them (HTTP, socket, CLI): each takes
the context and the caller, and answers a JSON-ready dict. The surfaces only map names and
arguments to these (SPEC section 11)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select

from gpulocker import allocations, fairshare, inventory, queue, quotas, reservations, scheduler
from gpulocker.context import Context
from gpulocker.errors import Invalid
from gpulocker.models import ACTIVE, BOOKED, WAITING, Allocation, utcnow
from gpulocker.scheduling_models import QueuedRequest, Reservation
from gpulocker.schemas_scheduling import MAX_CALENDAR_DAYS


def take(
    ctx: Context,
    actor: str,
    gpu_type: str,
    count: int | None,
    hours: float,
    wait: bool = False,
    wait_hours: float | None = None,
    gpu_ids: list[int] | None = None,
    user: str | None = None,
) -> tuple[list[Allocation], dict[str, Any] | None]:
    """An immediate request, or with `wait` one that may queue: (the allocations, None)
    when granted now, ([], the waiting request's record) when it waits in line."""
    if not wait:
        rows = allocations.request(
            ctx.db, ctx.settings, actor, gpu_type, count, hours, gpu_ids, user
        )
        return rows, None
    if gpu_ids is not None:
        raise Invalid("gpu_ids cannot wait: ask for a count")
    rows, waiting = scheduler.request_or_wait(
        ctx.db, ctx.settings, actor, gpu_type, count or 0, hours, wait_hours, user
    )
    if waiting is None:
        return rows, None
    scheduler.serve_queue(ctx.db, ctx.settings, utcnow())  # it may fit behind nobody
    return [], request_get(ctx, actor, waiting.id)["request"]


def request(
    ctx: Context,
    actor: str,
    gpu_type: str,
    count: int | None,
    hours: float,
    wait: bool = False,
    wait_hours: float | None = None,
    gpu_ids: list[int] | None = None,
    user: str | None = None,
) -> dict[str, Any]:
    """`take` as JSON: {"allocations": [...], "cuda_visible_devices": "..."} when granted,
    {"request": {...}} (202) when it waits."""
    rows, waiting = take(ctx, actor, gpu_type, count, hours, wait, wait_hours, gpu_ids, user)
    if waiting is not None:
        return {"request": waiting}
    return {
        "allocations": [r.to_dict() for r in rows],
        "cuda_visible_devices": allocations.cuda_visible_devices(ctx.db, rows),
    }


def submit(
    ctx: Context,
    actor: str,
    gpu_type: str,
    count: int,
    hours: float,
    wait_hours: float | None = None,
    user: str | None = None,
) -> dict[str, Any]:
    """Put a request in the line and serve the line at once: {"request": {...}}, granted
    already when nobody is ahead and GPUs are free."""
    row = queue.submit(ctx.db, ctx.settings, actor, gpu_type, count, hours, wait_hours, user)
    scheduler.serve_queue(ctx.db, ctx.settings, utcnow())
    return request_get(ctx, actor, row.id)


def _request_dicts(
    ctx: Context, rows: list[QueuedRequest], places: dict[int, int]
) -> list[dict[str, Any]]:
    """The public records of `rows`, a granted one with its CUDA line: two queries however
    many there are (the dashboard polls a user's whole list every second or two)."""
    ids = [i for row in rows for i in row.allocation_ids or []]
    with ctx.db.session() as session:
        held = {}
        if ids:
            held = {
                a.id: a for a in session.scalars(select(Allocation).where(Allocation.id.in_(ids)))
            }
        granted = [row for row in rows if row.allocation_ids]
        groups = [[held[i] for i in row.allocation_ids or [] if i in held] for row in granted]
        lines = dict(
            zip([row.id for row in granted], allocations.cuda_lines(session, groups), strict=True)
        )
    out = []
    for row in rows:
        record = row.to_dict(places.get(row.id))
        if row.id in lines:
            record["cuda_visible_devices"] = lines[row.id]
        out.append(record)
    return out


def _places(ctx: Context) -> dict[int, int]:
    with ctx.db.session() as session:
        return queue.positions(session, ctx.settings, utcnow())


def request_get(ctx: Context, actor: str, id: int) -> dict[str, Any]:
    row = queue.get(ctx.db, ctx.settings, actor, id)
    places = _places(ctx) if row.state == WAITING else {}
    return {"request": _request_dicts(ctx, [row], places)[0]}


def request_list(ctx: Context, actor: str, all: bool = False) -> dict[str, Any]:
    rows = queue.list_for(ctx.db, ctx.settings, actor, all_users=all)
    places = _places(ctx)
    return {"requests": _request_dicts(ctx, rows, places)}


def request_cancel(ctx: Context, actor: str, id: int) -> dict[str, Any]:
    return {"request": queue.cancel(ctx.db, ctx.settings, actor, id).to_dict()}


def queue_view(ctx: Context, actor: str) -> dict[str, Any]:
    """Every waiting request in order; user names only for the caller's own and admins."""
    admin = ctx.settings.is_admin(actor)
    with ctx.db.session() as session:
        line = queue.ordered(session, ctx.settings, utcnow())
        rows = {
            r.id: r
            for r in session.scalars(select(QueuedRequest).where(QueuedRequest.state == WAITING))
        }
    seen: dict[str, int] = {}
    out = []
    for item in line:
        seen[item.gpu_type] = seen.get(item.gpu_type, 0) + 1
        row = rows.get(item.id)
        if row is None:
            continue
        entry = row.to_dict(seen[item.gpu_type])
        entry["mine"] = row.user == actor
        if not (admin or row.user == actor):
            entry["user"] = None
        out.append(entry)
    return {"queue": out}


def book(
    ctx: Context,
    actor: str,
    gpu_type: str,
    count: int,
    start: str,
    hours: float,
    user: str | None = None,
) -> dict[str, Any]:
    try:
        when = datetime.fromisoformat(start.replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        raise Invalid("start must be an ISO 8601 date and time, e.g. 2026-12-24T09:00Z") from None
    row = reservations.book(ctx.db, ctx.settings, actor, gpu_type, count, when, hours, user)
    return {"reservation": row.to_dict()}


def reservation_list(ctx: Context, actor: str, all: bool = False) -> dict[str, Any]:
    rows = reservations.list_for(ctx.db, ctx.settings, actor, all_users=all)
    return {"reservations": [r.to_dict() for r in rows]}


def reservation_get(ctx: Context, actor: str, id: int) -> dict[str, Any]:
    return {"reservation": reservations.get(ctx.db, ctx.settings, actor, id).to_dict()}


def reservation_cancel(ctx: Context, actor: str, id: int) -> dict[str, Any]:
    return {"reservation": reservations.cancel(ctx.db, ctx.settings, actor, id).to_dict()}


def me(ctx: Context, actor: str) -> dict[str, Any]:
    """Usage, limits and fair-share usage, for /api/v1/me."""
    now = utcnow()
    with ctx.db.session() as session:
        summary = quotas.summary(session, ctx.settings, actor, now)
        share = fairshare.usage(session, ctx.settings, now, [actor]).get(actor, 0.0)
    return {
        "usage": {"gpus": summary["gpus"], "gpu_hours_week": summary["gpu_hours_week"]},
        "limits": summary["limits"],
        "fairshare_usage": round(share, 3),
    }


def calendar(
    ctx: Context, actor: str, gpu_type: str | None = None, days: float = 7
) -> dict[str, Any]:
    """Per GPU of a type: allocations to their end and bookings (each drawn on a GPU free for
    its whole window), for the next `days`. Names only for the caller's own and admins."""
    if (
        isinstance(days, bool)
        or not isinstance(days, int | float)
        or not 0 < days <= MAX_CALENDAR_DAYS
    ):
        raise Invalid(f"days must be more than 0 and at most {MAX_CALENDAR_DAYS}")
    admin = ctx.settings.is_admin(actor)
    now = utcnow()
    until = now + timedelta(days=days)
    with ctx.db.session() as session:
        types = inventory.known_types(session)
        gpu_type = gpu_type or (types[0] if types else None)
        if gpu_type not in types:
            raise Invalid(f"unknown GPU type {gpu_type!r} (known: {', '.join(types) or 'none'})")
        gpus = [g for g in inventory.all_gpus(session) if g.gpu_type == gpu_type]
        allocs = session.scalars(
            select(Allocation).where(Allocation.gpu_type == gpu_type, Allocation.state == ACTIVE)
        ).all()
        books = session.scalars(
            select(Reservation)
            .where(
                Reservation.gpu_type == gpu_type,
                Reservation.state == BOOKED,
                Reservation.start_at < until,
            )
            .order_by(Reservation.start_at)
        ).all()

    def who(user: str) -> str | None:
        return user if admin or user == actor else None

    lanes: dict[tuple[str, int], list[dict[str, Any]]] = {(g.host, g.gpu_id): [] for g in gpus}
    for a in allocs:
        lanes.setdefault((a.host, a.gpu_id), []).append(
            {
                "kind": "allocation",
                "id": a.id if who(a.user) else None,
                "user": who(a.user),
                "start": now.isoformat(),
                "end": a.expires_at.isoformat(),
                "mine": a.user == actor,
            }
        )
    busy_until = {
        key: max((datetime.fromisoformat(i["end"]) for i in items), default=now)
        for key, items in lanes.items()
    }
    for b in books:
        keys = [k for k in sorted(lanes) if k[0] == b.host and busy_until[k] <= b.start_at][
            : b.count
        ]
        for key in keys:
            lanes[key].append(
                {
                    "kind": "reservation",
                    "id": b.id if who(b.user) else None,
                    "user": who(b.user),
                    "start": b.start_at.isoformat(),
                    "end": b.end_at.isoformat(),
                    "mine": b.user == actor,
                }
            )
            busy_until[key] = b.end_at
    return {
        "gpu_type": gpu_type,
        "types": types,
        "from": now.isoformat(),
        "until": until.isoformat(),
        "gpus": [
            {"host": h, "gpu_id": g, "items": sorted(items, key=lambda i: i["start"])}
            for (h, g), items in sorted(lanes.items())
        ],
    }
