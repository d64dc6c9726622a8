"""Waiting requests (SPEC section 11): the line, its order, cancelling and timing out.

Order: a request that has waited longer than QUEUE_AGING_HOURS goes first (oldest first);
the others by their user's fair-share usage (smallest first), ties to the older request.
Granting is the scheduler's (scheduler.py); every state change here is a conditional
UPDATE from `waiting`, so a request ends once whoever tries.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from gpulocker import events, fairshare, inventory
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


def order_key(
    row: Any, usage: dict[str, float], now: datetime, aging_hours: float
) -> tuple[int, float, datetime, int]:
    """Aged requests first (oldest first), then by fair-share usage, then the older."""
    aged = now - row.created_at > timedelta(hours=aging_hours)
    return (0 if aged else 1, 0.0 if aged else usage.get(row.user, 0.0), row.created_at, row.id)


def ordered(session: Session, settings: Settings, now: datetime) -> list[Any]:
    """Every waiting request (id, user, gpu_type, count, hours, created_at), in the order
    the scheduler serves them. Plain rows, not ORM objects: a pass reads a thousand."""
    q = QueuedRequest
    stmt = select(q.id, q.user, q.gpu_type, q.count, q.hours, q.created_at)
    rows = list(session.execute(stmt.where(q.state == WAITING)))
    usage = fairshare.usage(session, settings, now, {r.user for r in rows})
    return sorted(rows, key=lambda r: order_key(r, usage, now, settings.queue_aging_hours))


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
