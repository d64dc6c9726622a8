"""The in-app inbox: a user's notifications, read and marked read by that user only."""

from __future__ import annotations

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from gpulocker.db import Database
from gpulocker.errors import NotFound
from gpulocker.models import Notification, utcnow


def list_for(
    session: Session,
    user: str,
    unread_only: bool = False,
    limit: int = 100,
    before_id: int | None = None,
) -> list[Notification]:
    """The user's notifications, newest first."""
    stmt = (
        select(Notification)
        .where(Notification.user == user)
        .order_by(Notification.id.desc())
        .limit(max(1, min(limit, 500)))
    )
    if unread_only:
        stmt = stmt.where(Notification.read_at.is_(None))
    if before_id:
        stmt = stmt.where(Notification.id < before_id)
    return list(session.scalars(stmt))


def unread_count(session: Session, user: str) -> int:
    """How many of the user's notifications are unread."""
    stmt = select(func.count()).where(Notification.user == user, Notification.read_at.is_(None))
    return session.scalar(stmt) or 0


def mark_read(db: Database, user: str, notification_id: int) -> Notification:
    """Mark one of the user's own notifications read (idempotent); another's is NotFound."""
    with db.transaction() as session:
        row = session.get(Notification, notification_id)
        if row is None or row.user != user:
            raise NotFound(f"no notification {notification_id}")
        if row.read_at is None:
            row.read_at = utcnow()
    return row


def mark_all_read(db: Database, user: str) -> int:
    """Mark every unread notification of the user read; returns how many."""
    with db.transaction() as session:
        result = session.execute(
            update(Notification)
            .where(Notification.user == user, Notification.read_at.is_(None))
            .values(read_at=utcnow())
        )
        return int(result.rowcount or 0)  # type: ignore[attr-defined]
