"""Booking ahead (SPEC section 11): GPUs of a type promised on one host for a window.

A booking is accepted only if some host's GPUs of the type cover, at every moment of the
window, every reservation and every allocation already promised then (capacity.py); it
takes `capacity.lock_type` first, so concurrent bookings decide one after the other and
the last free slot goes to exactly one. At its start the scheduler turns it into
allocations (scheduler.start_reservations).
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta

from sqlalchemy import select, update

from gpulocker import capacity, events, inventory, quotas
from gpulocker.config import Settings
from gpulocker.db import Database
from gpulocker.errors import Conflict, Forbidden, Invalid, NotFound
from gpulocker.limits import USER_NAME
from gpulocker.models import BOOKED, CANCELLED, utcnow
from gpulocker.notify import notify
from gpulocker.scheduling_models import Reservation


def _check(
    settings: Settings,
    actor: str,
    user: str,
    count: int,
    start: datetime,
    hours: float,
    now: datetime,
) -> None:
    if user != actor and not settings.is_admin(actor):
        raise Forbidden("only admins can book GPUs for another user")
    if not USER_NAME.match(user):
        raise Invalid(f"not a valid user name: {user!r}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise Invalid("count must be a whole number of GPUs, at least 1")
    if isinstance(hours, bool) or not isinstance(hours, int | float) or not math.isfinite(hours):
        raise Invalid("hours must be a number")
    if not 0 < hours <= settings.max_allocation_hours:
        raise Invalid(
            f"hours must be more than 0 and at most {settings.max_allocation_hours:g} (MAX_ALLOCATION_HOURS)"
        )
    if not isinstance(start, datetime) or start.tzinfo is None:
        raise Invalid("start must be a date and time with a time zone, e.g. 2026-12-24T09:00Z")
    if start < now:
        raise Invalid("start must not be in the past")
    if start > now + timedelta(days=settings.reservation_max_days_ahead):
        raise Invalid(
            f"start must be at most {settings.reservation_max_days_ahead:g} days ahead "
            "(RESERVATION_MAX_DAYS_AHEAD)"
        )


def book(
    db: Database,
    settings: Settings,
    actor: str,
    gpu_type: str,
    count: int,
    start: datetime,
    hours: float,
    user: str | None = None,
) -> Reservation:
    """Book `count` GPUs of `gpu_type` from `start` for `hours`, or refuse (409) naming the
    earliest start that would fit."""
    user = user or actor
    now = utcnow()
    _check(settings, actor, user, count, start, hours, now)
    end = start + timedelta(hours=hours)
    with db.transaction() as session:
        types = inventory.known_types(session)
        if gpu_type not in types:
            raise Invalid(f"unknown GPU type {gpu_type!r} (known: {', '.join(types) or 'none'})")
        quotas.check_hours(session, settings, user, count, hours, now)
        capacity.lock_type(session, gpu_type)
        host_plans = capacity.plans(session, gpu_type)
        fitting = [h for h in sorted(host_plans) if host_plans[h].fits(start, end, count)]
        if not fitting:
            earliest = capacity.sure_start(host_plans, start, count, hours)
            hint = (
                f"; the earliest start that fits is {earliest:%Y-%m-%d %H:%M} UTC"
                if earliest
                else ""
            )
            raise Conflict(
                f"{count} {gpu_type} GPU(s) on one host are not free for the whole window{hint}",
                earliest=earliest.isoformat() if earliest else None,
            )
        host = min(fitting, key=lambda h: (h != settings.gpu_host, h))
        row = Reservation(
            user=user,
            booked_by=actor,
            gpu_type=gpu_type,
            count=count,
            host=host,
            start_at=start,
            end_at=end,
            state=BOOKED,
            created_at=now,
        )
        session.add(row)
        session.flush()
        text = f"{count} {gpu_type} GPU(s) on {host} booked for {user} from {start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC"
        events.record(
            session, "booked", actor, text, user=user, host=host, data={"reservation_id": row.id}
        )
        notify(session, settings, "booked", f"Booking {row.id}: {text}.", users=[user])
    return row


def get(db: Database, settings: Settings, actor: str, reservation_id: int) -> Reservation:
    """One reservation, if the actor may see it (holder or admin)."""
    with db.session() as session:
        row = session.get(Reservation, reservation_id)
    if row is None or (row.user != actor and not settings.is_admin(actor)):
        raise NotFound(f"no reservation {reservation_id}")
    return row


def list_for(
    db: Database, settings: Settings, actor: str, all_users: bool = False, limit: int = 500
) -> list[Reservation]:
    """The actor's reservations (admins: everyone's with `all_users`), soonest first."""
    stmt = select(Reservation).order_by(Reservation.start_at, Reservation.id).limit(limit)
    if not (all_users and settings.is_admin(actor)):
        stmt = stmt.where(Reservation.user == actor)
    with db.session() as session:
        return list(session.scalars(stmt))


def cancel(db: Database, settings: Settings, actor: str, reservation_id: int) -> Reservation:
    """Cancel a booked reservation (holder or admin)."""
    row = get(db, settings, actor, reservation_id)
    with db.transaction() as session:
        result = session.execute(
            update(Reservation)
            .where(Reservation.id == row.id, Reservation.state == BOOKED)
            .values(state=CANCELLED, ended_at=utcnow(), reason=f"cancelled by {actor}")
            .execution_options(synchronize_session=False)
        )
        if not result.rowcount:  # type: ignore[attr-defined]
            raise Conflict(f"reservation {reservation_id} is {row.state}; only booked ones cancel")
        text = f"booking {row.id} ({row.count} {row.gpu_type} from {row.start_at:%Y-%m-%d %H:%M} UTC) cancelled"
        events.record(
            session,
            "booking_cancelled",
            actor,
            text,
            user=row.user,
            host=row.host,
            data={"reservation_id": row.id},
        )
        notify(session, settings, "booking_cancelled", f"Your {text}.", users=[row.user])
        fresh = session.get(Reservation, row.id)
        assert fresh is not None
        session.refresh(fresh)
        return fresh
