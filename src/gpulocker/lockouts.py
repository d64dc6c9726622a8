"""Lockouts: a user who used a GPU they did not hold may not allocate for a while."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import Row, bindparam, select, update
from sqlalchemy.orm import Session

from gpulocker import events
from gpulocker.config import Settings
from gpulocker.db import Database
from gpulocker.errors import Forbidden, LockedOut, NotFound
from gpulocker.models import Lockout, utcnow

_ACTIVE = (
    select(Lockout.until, Lockout.reason)
    .where(
        Lockout.user == bindparam("user"),
        Lockout.until > bindparam("now"),
        Lockout.lifted_at.is_(None),
    )
    .order_by(Lockout.until.desc())
    .limit(1)
)  # read by every request: built once


def active(session: Session, user: str, now: datetime | None = None) -> Row[datetime, str] | None:
    """When the user's lockout that ends last ends, and why (`until`, `reason`), if one is
    in force."""
    return session.execute(_ACTIVE, {"user": user, "now": now or utcnow()}).first()


def refuse_if_locked_out(session: Session, user: str) -> None:
    """Refuse (403 `locked_out`) a new allocation for `user` while a lockout is in force."""
    lockout = active(session, user)
    if lockout is not None:
        raise LockedOut(
            f"{user} is locked out until {lockout.until:%Y-%m-%d %H:%M} UTC ({lockout.reason})",
            until=lockout.until.isoformat(),
        )


def all_active(session: Session, now: datetime | None = None) -> list[Lockout]:
    """Every lockout in force, soonest end first."""
    now = now or utcnow()
    stmt = (
        select(Lockout)
        .where(Lockout.until > now, Lockout.lifted_at.is_(None))
        .order_by(Lockout.until)
    )
    return list(session.scalars(stmt))


def lock_out(
    session: Session, settings: Settings, user: str, reason: str, actor: str = "agent"
) -> datetime:
    """Lock `user` out for USER_LOCKOUT_HOURS (extending a lockout already in force);
    returns when the lockout in force now ends."""
    now = utcnow()
    until = now + timedelta(hours=settings.user_lockout_hours)
    current = active(session, user, now)
    if current is not None and current.until >= until:
        return current.until
    lockout = Lockout(user=user, created_at=now, until=until, reason=reason, created_by=actor)
    session.add(lockout)
    events.record(
        session,
        "lockout",
        actor,
        f"{user} locked out until {until:%Y-%m-%d %H:%M} UTC: {reason}",
        user=user,
        data={"until": until.isoformat(), "reason": reason},
    )
    return until


def lift(db: Database, settings: Settings, actor: str, user: str) -> int:
    """Admin: end every lockout of `user` now. Returns how many were lifted."""
    if not settings.is_admin(actor):
        raise Forbidden("only admins can lift a lockout")
    now = utcnow()
    with db.transaction() as session:
        result = session.execute(
            update(Lockout)
            .where(Lockout.user == user, Lockout.until > now, Lockout.lifted_at.is_(None))
            .values(lifted_at=now, lifted_by=actor)
        )
        lifted = int(result.rowcount or 0)  # type: ignore[attr-defined]
        if not lifted:
            raise NotFound(f"{user} is not locked out")
        events.record(session, "lockout_lifted", actor, f"lockout of {user} lifted", user=user)
    return lifted
