"""The scheduling pass (SPEC section 11): expire, remind, start bookings, serve the line.

One pass, in this order: waiting requests past their wait end `expired`; holders of GPUs
a booking needs soon are reminded; bookings whose start has come become allocations
(ahead of every waiting request), ending an overstaying allocation with reason `reserved`;
then the line is served in queue.ordered's order. A request that does not fit now blocks
its type for the ones behind it, except a smaller one that ends before the moment the
blocked one is sure to have its GPUs (backfill).

A pass reads what it decides on once (scheduling_view.load: a fixed handful of queries
however long the line), decides in memory, and opens a write transaction only for what
is due and for each grant; a pass with nothing to do writes nothing.

Every grant is one transaction: a conditional UPDATE of the request from `waiting` to
`granted`, then the allocations through allocations._grant (lockout, maintenance,
quotas, bookings, the unique index on active GPUs). Whoever runs a pass at the same time
(any agent, any web worker), a request is granted once and a GPU held once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from gpulocker import allocations, capacity, events, inventory, queue, scheduling_view
from gpulocker.config import Settings
from gpulocker.db import Database
from gpulocker.errors import Forbidden, NotEnoughGPUs
from gpulocker.models import ACTIVE, BOOKED, FAILED, GRANTED, STARTED, WAITING, Allocation, utcnow
from gpulocker.notify import notify
from gpulocker.scheduling_models import QueuedRequest, Reservation

log = logging.getLogger(__name__)


@dataclass
class PassResult:
    """What one pass did."""

    expired: int = 0
    reminded: int = 0
    started: int = 0
    failed: int = 0
    granted: int = 0


def request_or_wait(
    db: Database,
    settings: Settings,
    actor: str,
    gpu_type: str,
    count: int,
    hours: float,
    wait_hours: float | None = None,
    user: str | None = None,
) -> tuple[list[Allocation], QueuedRequest | None]:
    """A request with `wait`: granted now if it can be, else put in the line."""
    queue.check_wait(settings, wait_hours)  # refused alike whether it would wait or not
    try:
        return allocations.request(db, settings, actor, gpu_type, count, hours, user=user), None
    except (NotEnoughGPUs, Forbidden) as exc:
        if isinstance(exc, Forbidden) and exc.code != "quota":
            raise
    return [], queue.submit(db, settings, actor, gpu_type, count, hours, wait_hours, user)


def grant(db: Database, settings: Settings, request_id: int) -> list[Allocation]:
    """Grant one waiting request now, all or nothing, once; [] if it cannot be (yet)."""
    try:
        with db.transaction() as session:
            row = session.get(QueuedRequest, request_id)
            if row is None:
                return []
            won = session.execute(
                update(QueuedRequest)
                .where(QueuedRequest.id == request_id, QueuedRequest.state == WAITING)
                .values(state=GRANTED, ended_at=utcnow())
                .execution_options(synchronize_session=False)
            )
            if not won.rowcount:  # type: ignore[attr-defined]
                return []  # another process granted, cancelled or expired it
            granted = allocations._grant(
                session,
                settings,
                row.requested_by,
                row.user,
                row.gpu_type,
                row.count,
                row.hours,
                None,
            )
            ids = [a.id for a in granted]
            session.execute(
                update(QueuedRequest)
                .where(QueuedRequest.id == request_id)
                .values(host=granted[0].host, allocation_ids=ids)
                .execution_options(synchronize_session=False)
            )
            waited = utcnow() - row.created_at
            events.record(
                session,
                "request_granted",
                "scheduler",
                f"request {row.id} of {row.user} granted from the queue after "
                f"{waited.total_seconds() / 60:.0f} min: GPU(s) "
                f"{allocations.cuda_visible_devices(session, granted)} on {granted[0].host}",
                user=row.user,
                host=granted[0].host,
                data={"request_id": row.id, "allocation_ids": ids},
            )
            return granted
    except (NotEnoughGPUs, Forbidden) as exc:
        log.debug("request %s waits: %s", request_id, exc)
    except IntegrityError:
        log.info("request %s lost a race for a GPU; it waits for the next pass", request_id)
    return []


def remind_reservations(db: Database, settings: Settings, now: datetime) -> int:
    """Tell holders of GPUs a booking needs, EXPIRY_REMINDER_MINUTES before it starts."""
    soon = now + timedelta(minutes=settings.expiry_reminder_minutes)
    grace = timedelta(hours=settings.expiry_grace_hours)
    reminded = 0
    with db.transaction() as session:
        due = session.scalars(
            select(Reservation).where(
                Reservation.state == BOOKED,
                Reservation.start_at <= soon,
                Reservation.reminded_at.is_(None),
            )
        ).all()
        for res in due:
            res.reminded_at = now
            holders = session.scalars(
                select(Allocation).where(
                    Allocation.host == res.host,
                    Allocation.gpu_type == res.gpu_type,
                    Allocation.state == ACTIVE,
                )
            ).all()
            for alloc in holders:
                if alloc.expires_at + grace > res.start_at:
                    reminded += 1
                    notify(
                        session,
                        settings,
                        "reserved_soon",
                        f"GPU {alloc.gpu_id} ({alloc.gpu_type}) on {alloc.host} is booked from "
                        f"{res.start_at:%Y-%m-%d %H:%M} UTC: your allocation {alloc.id} ends "
                        "then (reason: reserved). Save your work.",
                        users=[alloc.user],
                    )
    return reminded


def _fail(db: Database, settings: Settings, res_id: int, why: str) -> None:
    with db.transaction() as session:
        res = session.get(Reservation, res_id)
        assert res is not None
        done = session.execute(
            update(Reservation)
            .where(Reservation.id == res_id, Reservation.state == BOOKED)
            .values(state=FAILED, ended_at=utcnow(), reason=why)
            .execution_options(synchronize_session=False)
        )
        if done.rowcount:  # type: ignore[attr-defined]
            text = f"booking {res.id} ({res.count} {res.gpu_type} on {res.host}) failed: {why}"
            events.record(
                session,
                "reservation_failed",
                "scheduler",
                text,
                user=res.user,
                host=res.host,
                data={"reservation_id": res.id},
            )
            notify(
                session,
                settings,
                "reservation_failed",
                f"Your {text}.",
                users=[res.user],
                admins=True,
            )


def start_reservation(db: Database, settings: Settings, res_id: int, now: datetime) -> bool:
    """Turn a booking whose start has come into allocations ending at its end."""
    with db.session() as session:
        res = session.get(Reservation, res_id)
    if res is None or res.state != BOOKED:
        return False
    if res.end_at <= now:
        _fail(db, settings, res_id, "its window passed before it could start")
        return False
    try:
        with db.transaction() as session:
            capacity.lock_type(session, res.gpu_type)
            won = session.execute(
                update(Reservation)
                .where(Reservation.id == res_id, Reservation.state == BOOKED)
                .values(state=STARTED)
                .execution_options(synchronize_session=False)
            )
            if not won.rowcount:  # type: ignore[attr-defined]
                return False
            free = [g for g in inventory.free_gpus(session, res.gpu_type) if g.host == res.host]
            if len(free) < res.count:
                holders = session.scalars(
                    select(Allocation)
                    .where(
                        Allocation.host == res.host,
                        Allocation.gpu_type == res.gpu_type,
                        Allocation.state == ACTIVE,
                    )
                    .order_by(Allocation.expires_at, Allocation.id)
                ).all()
                for alloc in holders[: res.count - len(free)]:
                    allocations.finish(session, settings, alloc, "revoked", "reserved", "scheduler")
                session.flush()
                free = [g for g in inventory.free_gpus(session, res.gpu_type) if g.host == res.host]
            if len(free) < res.count:
                raise NotEnoughGPUs(f"only {len(free)} healthy {res.gpu_type} GPU(s) on {res.host}")
            rows = [
                Allocation(
                    user=res.user,
                    host=gpu.host,
                    gpu_id=gpu.gpu_id,
                    gpu_type=gpu.gpu_type,
                    device=gpu.device,
                    created_at=now,
                    expires_at=res.end_at,
                    state=ACTIVE,
                )
                for gpu in free[: res.count]
            ]
            session.add_all(rows)
            session.flush()
            ids = [r.id for r in rows]
            session.execute(
                update(Reservation)
                .where(Reservation.id == res_id)
                .values(allocation_ids=ids)
                .execution_options(synchronize_session=False)
            )
            cuda = allocations.cuda_visible_devices(session, rows)
            text = f"booking {res.id} started: GPU(s) {cuda} ({res.gpu_type}) on {res.host} until {res.end_at:%Y-%m-%d %H:%M} UTC"
            for row in rows:
                events.record(
                    session,
                    "granted",
                    "scheduler",
                    text,
                    user=res.user,
                    host=row.host,
                    gpu_id=row.gpu_id,
                    allocation_id=row.id,
                    data={"reservation_id": res.id, "expires_at": res.end_at.isoformat()},
                )
            events.record(
                session,
                "reservation_started",
                "scheduler",
                text,
                user=res.user,
                host=res.host,
                data={"reservation_id": res.id, "allocation_ids": ids},
            )
            notify(
                session,
                settings,
                "reservation_started",
                f"Your {text}. export CUDA_VISIBLE_DEVICES={cuda}",
                users=[res.user],
            )
            return True
    except (NotEnoughGPUs, IntegrityError) as exc:
        why = exc.message if isinstance(exc, NotEnoughGPUs) else "a GPU was taken at the same time"
        _fail(db, settings, res_id, why)
    return False


def serve_queue(
    db: Database, settings: Settings, now: datetime, view: scheduling_view.PassView | None = None
) -> int:
    """Grant what the line allows, in order, with backfill that never delays a blocked one.

    Decided on `view` (read once, scheduling_view.load), kept up to date in memory after
    each grant; only the grants themselves touch the database."""
    if view is None:
        with db.session() as session:
            view = scheduling_view.load(session, settings, now)
    granted = 0
    for row in view.line:
        line = view.types.get(row.gpu_type)
        if line is None:
            continue  # no such type (any more): it waits, and blocks nothing
        if not line.fits(row.count, row.hours):
            line.block(row.count, row.hours)
            continue
        if line.delays_blocked(row.hours):
            continue  # granting it would delay a request ahead of it
        why = view.refusal(db, settings, row)
        if why is not None:
            log.debug("request %s waits: %s", row.id, why)
            continue
        rows = grant(db, settings, row.id)
        if rows:
            granted += 1
            view.granted(row, rows)
            continue
        with db.session() as session:  # refused after all: the picture was stale
            fresh = scheduling_view.read_type(session, row.gpu_type, view.silent, now)
        line.changed(fresh.plans)
        if not line.fits(row.count, row.hours):
            line.block(row.count, row.hours)  # it waits, and those behind must not delay it
    return granted


def run_pass(db: Database, settings: Settings, now: datetime | None = None) -> PassResult:
    """One whole scheduling pass (see the module docstring). Reads once; opens a write
    transaction only for what is due and for each grant."""
    now = now or utcnow()
    result = PassResult()
    with db.session() as session:
        view = scheduling_view.load(session, settings, now)
    if view.due:
        result.expired = queue.expire_due(db, settings, now)
    if view.to_remind:
        result.reminded = remind_reservations(db, settings, now)
    for res_id in view.to_start:
        if start_reservation(db, settings, res_id, now):
            result.started += 1
        else:
            result.failed += 1
    if view.to_start:  # allocations began and ended: read the picture again
        with db.session() as session:
            view = scheduling_view.load(session, settings, now)
    result.granted = serve_queue(db, settings, now, view)
    return result
