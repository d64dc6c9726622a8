"""Waiting requests (SPEC section 11): the line, its order, cancelling and timing out.

Order: a request that has waited longer than QUEUE_AGING_HOURS (aged) goes before every
request that has not; within each of the two, by the user's fair-share usage (smallest
first), ties to the older request. Aged requests among themselves are not oldest first:
in a line that stays long every request ages, and oldest first made the line first come
first served, heavy users' long jobs ahead of light users' (bench/simulate_week.py).
Granting is the scheduler's (scheduler.py); every state change here is a conditional
UPDATE from `waiting`, so a request ends once whoever tries.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import bindparam, select, update
from sqlalchemy.orm import Session

from gpulocker import events, fairshare, inventory, lockouts, maintenance
from gpulocker.config import Settings
from gpulocker.db import Database
from gpulocker.errors import Conflict, Invalid, NotFound
from gpulocker.limits import check_request
from gpulocker.models import CANCELLED, EXPIRED, WAITING, utcnow
from gpulocker.notify import notify
from gpulocker.scheduling_models import QueuedRequest


def submit(
    db: Database,
    settings: Settings,
    actor: str,
    gpu_type: str,
    count: int,
    hours: float,
    wait_hours: float | None = None,
    user: str | None = None,
) -> QueuedRequest:
    """Put a request in the line; it waits at most `wait_hours` (<= QUEUE_MAX_WAIT_HOURS)."""
    user = user or actor
    count = check_request(settings, actor, user, count, hours, None)
    wait_hours = check_wait(settings, wait_hours)
    now = utcnow()
    with db.transaction() as session:
        types = inventory.known_types(session)
        if gpu_type not in types:
            raise Invalid(f"unknown GPU type {gpu_type!r} (known: {', '.join(types) or 'none'})")
        # What bars a request whatever is free bars waiting too (a quota only makes it wait).
        maintenance.refuse_if_on(session, settings, actor)
        lockouts.refuse_if_locked_out(session, user)
        row = QueuedRequest(
            user=user,
            requested_by=actor,
            gpu_type=gpu_type,
            count=count,
            hours=float(hours),
            state=WAITING,
            created_at=now,
            wait_until=now + timedelta(hours=wait_hours),
        )
        session.add(row)
        session.flush()
        text = (
            f"request {row.id}: {count} {gpu_type} GPU(s) for {hours:g} h waits for GPUs "
            f"until {row.wait_until:%Y-%m-%d %H:%M} UTC"
        )
        events.record(session, "queued", actor, text, user=user, data={"request_id": row.id})
        notify(session, settings, "queued", f"Your {text}.", users=[user])
    return row


def check_wait(settings: Settings, wait_hours: float | None) -> float:
    """How long a request may wait: `wait_hours`, at most QUEUE_MAX_WAIT_HOURS (its default)."""
    limit = settings.queue_max_wait_hours
    if wait_hours is None:
        return limit
    bad = isinstance(wait_hours, bool) or not isinstance(wait_hours, int | float)
    if bad or not math.isfinite(wait_hours) or not 0 < wait_hours <= limit:
        raise Invalid(
            f"wait_hours must be more than 0 and at most {limit:g} (QUEUE_MAX_WAIT_HOURS)"
        )
    return float(wait_hours)


class Waiting(NamedTuple):
    """A waiting request as the scheduler reads it: `aged` (it waited longer than
    QUEUE_AGING_HOURS) and `due` (its wait ended) come from the database, so a pass
    converts no dates."""

    id: int
    user: str
    requested_by: str
    gpu_type: str
    count: int  # type: ignore[assignment]  # a field, where tuples have a method
    hours: float
    aged: bool
    due: bool


def _line_statement() -> Any:
    q = QueuedRequest
    aged = (q.created_at < bindparam("cutoff")).label("aged")
    due = (q.wait_until <= bindparam("now")).label("due")
    stmt = select(q.id, q.user, q.requested_by, q.gpu_type, q.count, q.hours, aged, due)
    return stmt.where(q.state == WAITING).order_by(q.created_at, q.id)


_LINE = _line_statement()  # built once (see capacity._PLANS)


def read_line(session: Session, settings: Settings, now: datetime) -> list[Waiting]:
    """Every waiting request, oldest first."""
    cutoff = now - timedelta(hours=settings.queue_aging_hours)
    rows = session.connection().execute(_LINE, {"cutoff": cutoff, "now": now}).all()
    return list(map(Waiting._make, rows))


def in_order(rows: Iterable[Waiting], usage: dict[str, float]) -> list[Waiting]:
    """The serving order of rows as read_line gives them (oldest first): aged requests
    before the others, each by their user's fair-share usage, smallest first; ties keep
    the older first (the sort is stable)."""
    return sorted(rows, key=lambda r: (not r.aged, usage.get(r.user, 0.0)))


def ordered(session: Session, settings: Settings, now: datetime) -> list[Waiting]:
    """Every waiting request (read_line's rows), in the order the scheduler serves them."""
    rows = read_line(session, settings, now)
    return in_order(rows, fairshare.usage(session, settings, now, {r.user for r in rows}))


def positions(session: Session, settings: Settings, now: datetime) -> dict[int, int]:
    """Request id -> its place in its GPU type's line (1 = next)."""
    places: dict[int, int] = {}
    seen: dict[str, int] = {}
    for row in ordered(session, settings, now):
        seen[row.gpu_type] = seen.get(row.gpu_type, 0) + 1
        places[row.id] = seen[row.gpu_type]
    return places


def get(db: Database, settings: Settings, actor: str, request_id: int) -> QueuedRequest:
    """One request, if the actor may see it (its user or an admin)."""
    with db.session() as session:
        row = session.get(QueuedRequest, request_id)
    if row is None or (row.user != actor and not settings.is_admin(actor)):
        raise NotFound(f"no request {request_id}")
    return row


def list_for(
    db: Database, settings: Settings, actor: str, all_users: bool = False, limit: int = 500
) -> list[QueuedRequest]:
    """The actor's requests (admins: everyone's with `all_users`), newest first."""
    stmt = select(QueuedRequest).order_by(QueuedRequest.id.desc()).limit(limit)
    if not (all_users and settings.is_admin(actor)):
        stmt = stmt.where(QueuedRequest.user == actor)
    with db.session() as session:
        return list(session.scalars(stmt))


def end(
    session: Session, settings: Settings, row: QueuedRequest, state: str, reason: str, actor: str
) -> bool:
    """Move a waiting request to `state` (cancelled, expired); False if it was not waiting."""
    result = session.execute(
        update(QueuedRequest)
        .where(QueuedRequest.id == row.id, QueuedRequest.state == WAITING)
        .values(state=state, ended_at=utcnow(), reason=reason)
        .execution_options(synchronize_session=False)
    )
    if not result.rowcount:  # type: ignore[attr-defined]
        return False
    session.refresh(row)
    text = f"request {row.id} ({row.count} {row.gpu_type} GPU(s)) {state}: {reason}"
    events.record(
        session, f"request_{state}", actor, text, user=row.user, data={"request_id": row.id}
    )
    notify(session, settings, f"request_{state}", f"Your {text}.", users=[row.user])
    return True


def cancel(db: Database, settings: Settings, actor: str, request_id: int) -> QueuedRequest:
    """Cancel a waiting request (its user or an admin)."""
    get(db, settings, actor, request_id)
    with db.transaction() as session:
        row = session.get(QueuedRequest, request_id)
        assert row is not None
        if not end(session, settings, row, CANCELLED, f"cancelled by {actor}", actor):
            raise Conflict(f"request {request_id} is {row.state}; only waiting ones cancel")
        return row


def expire_due(db: Database, settings: Settings, now: datetime) -> int:
    """End every waiting request past its wait_until; returns how many."""
    with db.transaction() as session:
        due = session.scalars(
            select(QueuedRequest).where(
                QueuedRequest.state == WAITING, QueuedRequest.wait_until <= now
            )
        ).all()
        return sum(end(session, settings, r, EXPIRED, "waited too long", "scheduler") for r in due)
