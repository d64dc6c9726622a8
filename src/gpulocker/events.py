"""The audit log: every state change is recorded as an event (who, what, when, why)."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from gpulocker import changes
from gpulocker.models import Event, utcnow

log = logging.getLogger("gpulocker.events")


def record(
    session: Session,
    kind: str,
    actor: str,
    message: str,
    *,
    user: str | None = None,
    host: str | None = None,
    gpu_id: int | None = None,
    allocation_id: int | None = None,
    data: dict[str, Any] | None = None,
    at: datetime | None = None,
) -> Event:
    """Add an event to the session's transaction and write it to the log too."""
    event = Event(
        at=at or utcnow(),
        kind=kind,
        actor=actor,
        user=user,
        host=host,
        gpu_id=gpu_id,
        allocation_id=allocation_id,
        message=message,
        data=data,
    )
    session.add(event)
    changes.mark(session, host)
    log.info("%s by %s: %s", kind, actor, message)
    return event


def kinds(session: Session) -> list[str]:
    """Every kind of event recorded, sorted (the events page's filter).

    A loose index scan of ix_events_kind_at: one probe per kind, each for the next kind
    after the last, instead of `SELECT DISTINCT kind`, which reads every event (a year of
    them on a busy lab). The same recursive query on SQLite and PostgreSQL.
    """
    e = Event
    first = select(e.kind).order_by(e.kind).limit(1).scalar_subquery()
    found = select(first.label("kind")).cte("kinds", recursive=True)
    after = select(e.kind).where(e.kind > found.c.kind).order_by(e.kind).limit(1)
    found = found.union_all(select(after.scalar_subquery()).where(found.c.kind.is_not(None)))
    return sorted(k for k in session.scalars(select(found.c.kind)) if k is not None)


def latest_id(session: Session) -> int:
    """The id of the newest event: a cheap change counter for anyone waiting on changes."""
    return session.scalar(select(func.max(Event.id))) or 0


def query(
    session: Session,
    *,
    user: str | None = None,
    kind: str | None = None,
    gpu_id: int | None = None,
    host: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    before_id: int | None = None,
    limit: int = 50,
) -> list[Event]:
    """Events newest first, filtered; page with `before_id` (the last id of the previous page)."""
    stmt = select(Event).order_by(Event.id.desc()).limit(max(1, min(limit, 500)))
    if user:
        stmt = stmt.where(Event.user == user)
    if kind:
        stmt = stmt.where(Event.kind == kind)
    if gpu_id is not None:
        stmt = stmt.where(Event.gpu_id == gpu_id)
    if host:
        stmt = stmt.where(Event.host == host)
    if since:
        stmt = stmt.where(Event.at >= since)
    if until:
        stmt = stmt.where(Event.at < until)
    if before_id:
        stmt = stmt.where(Event.id < before_id)
    return list(session.scalars(stmt))
