"""Allocations: take GPUs, extend, release. The rules of SPEC section 5, with no web in them.

Two requests can never get the same GPU: the unique partial index on the (host, GPU)
of active allocations refuses the second insert, on SQLite and PostgreSQL alike. A
request that loses such a race looks again at what is free and tries once more.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import Connection, bindparam, func, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from gpulocker import (
    capacity,
    cudaline,
    events,
    inventory,
    limits,
    lockouts,
    maintenance,
    quotas,
)
from gpulocker.config import Settings
from gpulocker.db import Database
from gpulocker.errors import (
    Conflict,
    Forbidden,
    Invalid,
    NotEnoughGPUs,
    NotFound,
)
from gpulocker.models import ACTIVE, RELEASED, REVOKED, STATES, Allocation, Gpu, utcnow
from gpulocker.notify import notify

log = logging.getLogger(__name__)


def request(
    db: Database,
    settings: Settings,
    actor: str,
    gpu_type: str,
    count: int | None = None,
    hours: float = 1.0,
    gpu_ids: Sequence[int] | None = None,
    user: str | None = None,
) -> list[Allocation]:
    """Allocate `count` GPUs of `gpu_type` for `hours`, all or nothing.

    Admins may allocate for another `user`. `gpu_ids` asks for those GPUs exactly.
    """
    user = user or actor
    count = limits.check_request(settings, actor, user, count, hours, gpu_ids)

    def check(session: Session) -> None:
        """Refusals are decided on a read, so a flood of hopeless requests (an unknown
        type, no free GPU) never takes the write lock the agent's loop needs (SPEC §12)."""
        _check_rules(
            session, settings, actor, user, gpu_type, count, hours, gpu_ids, take_turns=False
        )

    def still_free(conn: Connection) -> None:  # the ones before may have taken the GPUs
        refusal = capacity.shortage(conn, settings, gpu_type, count) if gpu_ids is None else None
        if refusal is not None:
            raise refusal

    # Every lost race means another request took a GPU, so this ends: bounded by the GPUs.
    for _attempt in range(64):
        try:
            # Requests take turns: a waiter starts the moment the one before commits, and
            # then sees what it took (no lost race to retry, no busy-handler sleeps). The
            # write transaction checks everything again.
            with db.serialized("allocate", check=check, quick=still_free) as session:
                granted = _grant(session, settings, actor, user, gpu_type, count, hours, gpu_ids)
            return granted
        except IntegrityError:
            log.info("request by %s lost a race for a %s GPU; trying again", user, gpu_type)
    raise NotEnoughGPUs(f"could not get {count} {gpu_type} GPU(s): too many requests at once")


def _grant(
    session: Session,
    settings: Settings,
    actor: str,
    user: str,
    gpu_type: str,
    count: int,
    hours: float,
    gpu_ids: Sequence[int] | None,
) -> list[Allocation]:
    """Inside one write transaction: check the rules that read the database, then insert."""
    chosen = _check_rules(session, settings, actor, user, gpu_type, count, hours, gpu_ids)
    now = utcnow()
    expires = now + timedelta(hours=hours)
    rows = [
        Allocation(
            user=user,
            host=gpu.host,
            gpu_id=gpu.gpu_id,
            gpu_type=gpu.gpu_type,
            device=gpu.device,
            created_at=now,
            expires_at=expires,
            state=ACTIVE,
        )
        for gpu in chosen
    ]
    session.add_all(rows)
    session.flush()  # the unique index speaks here if another request was faster
    for row in rows:
        events.record(
            session,
            "granted",
            actor,
            f"GPU {row.gpu_id} ({row.gpu_type}) on {row.host} to {user} for {hours:g} h",
            user=user,
            host=row.host,
            gpu_id=row.gpu_id,
            allocation_id=row.id,
            data={"hours": hours, "expires_at": expires.isoformat()},
        )
    gpu_list = ", ".join(str(r.gpu_id) for r in rows)
    notify(
        session,
        settings,
        "granted",
        f"You have GPU(s) {gpu_list} ({gpu_type}) on {rows[0].host} until "
        f"{expires:%Y-%m-%d %H:%M} UTC. {cudaline.export_line(cuda_visible_devices(session, rows))}",
        users=[user],
    )
    return rows


def _take_turns(session: Session, user: str) -> None:
    """Make one user's concurrent requests take turns, so MAX_GPUS_PER_USER holds.

    The unique index stops two requests taking the same GPU, but not one user taking two
    different GPUs in two parallel transactions that each counted what the user held.
    SQLite already runs writers one at a time; PostgreSQL gets a transaction-scoped lock
    keyed by the user name.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(
            text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": f"gpulocker:user:{user}"}
        )


def _check_rules(
    session: Session,
    settings: Settings,
    actor: str,
    user: str,
    gpu_type: str,
    count: int,
    hours: float,
    gpu_ids: Sequence[int] | None,
    take_turns: bool = True,
) -> list[capacity.Slot]:
    """The rules that read the database; the GPUs to take, or the refusal. `take_turns`
    serialises one user's requests (only inside the write transaction)."""
    types = inventory.known_types(session)
    if gpu_type not in types:
        known = ", ".join(types) or "none"
        raise Invalid(f"unknown GPU type {gpu_type!r} (known: {known})")
    maintenance.refuse_if_on(session, settings, actor)
    lockouts.refuse_if_locked_out(session, user)
    now = utcnow()
    if take_turns:
        _take_turns(session, user)
    quotas.check(session, settings, user, count, hours, now)
    if take_turns:
        capacity.lock_type(session, gpu_type)
    return capacity.choose(session, settings, gpu_type, count, hours, now, gpu_ids)


def cuda_visible_devices(db: Database | Session, allocations: Sequence[Allocation]) -> str:
    """The value for CUDA_VISIBLE_DEVICES: each GPU's UUID from the inventory (its index
    when the backend knows none), in NVML index order (SPEC §5). The one place that says
    how a grant is named for CUDA: the API, the socket, notifications, the CLI and the
    dashboard all print this."""
    pairs = [(a.host, a.gpu_id) for a in allocations]
    if isinstance(db, Database):
        with db.session() as session:
            uuids = _uuids(session, pairs)
    else:
        uuids = _uuids(db, pairs)
    return cudaline.value((gpu_id, uuids.get((host, gpu_id))) for host, gpu_id in pairs)


_UUIDS = select(Gpu.host, Gpu.gpu_id, Gpu.uuid).where(
    Gpu.host.in_(bindparam("hosts", expanding=True)),
    Gpu.gpu_id.in_(bindparam("ids", expanding=True)),
)  # every grant names its GPUs: built once


def cuda_lines(session: Session, groups: Sequence[Sequence[Allocation]]) -> list[str]:
    """`cuda_visible_devices` of each group of allocations, with one query for them all."""
    uuids = _uuids(session, [(a.host, a.gpu_id) for group in groups for a in group])
    return [cudaline.value((a.gpu_id, uuids.get((a.host, a.gpu_id))) for a in g) for g in groups]


def _uuids(session: Session, pairs: list[tuple[str, int]]) -> dict[tuple[str, int], str | None]:
    wanted = set(pairs)
    if not wanted:
        return {}
    params = {"hosts": sorted({h for h, _ in wanted}), "ids": sorted({i for _, i in wanted})}
    rows = session.connection().execute(_UUIDS, params).all()
    return {(h, i): u for h, i, u in rows if (h, i) in wanted}


def count_active(session: Session, user: str) -> int:
    """How many GPUs `user` holds now."""
    stmt = select(func.count()).where(Allocation.user == user, Allocation.state == ACTIVE)
    return session.scalar(stmt) or 0


def get(session: Session, settings: Settings, actor: str, allocation_id: int) -> Allocation:
    """One allocation, if the actor may see it (holder or admin); else NotFound."""
    row = session.get(Allocation, allocation_id)
    if row is None or (row.user != actor and not settings.is_admin(actor)):
        raise NotFound(f"no allocation {allocation_id}")
    return row


def list_for(
    session: Session,
    settings: Settings,
    actor: str,
    all_users: bool = False,
    state: str | None = ACTIVE,
    limit: int = 500,
) -> list[Allocation]:
    """The actor's allocations (admins: everyone's with `all_users`), newest first."""
    if state is not None and state not in STATES:
        raise Invalid(f"state must be one of {', '.join(STATES)}")
    stmt = select(Allocation).order_by(Allocation.id.desc()).limit(limit)
    if not (all_users and settings.is_admin(actor)):
        stmt = stmt.where(Allocation.user == actor)
    if state is not None:
        stmt = stmt.where(Allocation.state == state)
    return list(session.scalars(stmt))


def active_on_host(session: Session, host: str) -> list[Allocation]:
    """Every active allocation of one host: the desired state its agent enforces."""
    stmt = select(Allocation).where(Allocation.host == host, Allocation.state == ACTIVE)
    return list(session.scalars(stmt.order_by(Allocation.gpu_id)))


def extend(
    db: Database, settings: Settings, actor: str, allocation_id: int, hours: float
) -> Allocation:
    """Move an active allocation's end `hours` later, up to now + MAX_ALLOCATION_HOURS."""
    limits.check_hours(settings, hours)
    with db.transaction() as session:
        row = get(session, settings, actor, allocation_id)
        if row.state != ACTIVE:
            raise Conflict(f"allocation {allocation_id} is {row.state}; only active ones extend")
        now = utcnow()
        new_end = max(row.expires_at, now) + timedelta(hours=hours)
        limit = now + timedelta(hours=settings.max_allocation_hours)
        if new_end > limit:
            raise Invalid(
                f"the new end would be past now + {settings.max_allocation_hours:g} h "
                "(MAX_ALLOCATION_HOURS)",
                latest=limit.isoformat(),
            )
        capacity.lock_type(session, row.gpu_type)
        plan = capacity.plans(session, row.gpu_type).get(row.host)
        start = max(row.expires_at, now)
        if plan is not None and not plan.fits(start, new_end, 1):
            limit = plan.free_until(start, 1) or start
            raise Conflict(
                f"GPU {row.gpu_id} ({row.gpu_type}) on {row.host} is booked from "
                f"{limit:%Y-%m-%d %H:%M} UTC: it can be extended to that at most",
                until=limit.isoformat(),
            )
        row.expires_at = new_end
        row.reminded_at = row.expiry_warned_at = row.idle_warned_at = None
        events.record(
            session,
            "extended",
            actor,
            f"allocation {row.id} (GPU {row.gpu_id}) extended by {hours:g} h to "
            f"{new_end:%Y-%m-%d %H:%M} UTC",
            user=row.user,
            host=row.host,
            gpu_id=row.gpu_id,
            allocation_id=row.id,
            data={"hours": hours, "expires_at": new_end.isoformat()},
        )
    return row


def release(
    db: Database, settings: Settings, actor: str, allocation_id: int, reason: str = "released"
) -> Allocation:
    """End an active allocation now (holder or admin). The agent then revokes access."""
    with db.transaction() as session:
        row = get(session, settings, actor, allocation_id)
        if not finish(session, settings, row, RELEASED, reason, actor):
            raise Conflict(f"allocation {allocation_id} is already {row.state}")
    return row


def release_all(db: Database, settings: Settings, actor: str, user: str | None = None) -> int:
    """End every active allocation of `user` (default: the actor). Returns how many."""
    user = user or actor
    if user != actor and not settings.is_admin(actor):
        raise Forbidden("only admins can release another user's GPUs")
    with db.transaction() as session:
        rows = session.scalars(
            select(Allocation).where(Allocation.user == user, Allocation.state == ACTIVE)
        ).all()
        return sum(finish(session, settings, r, RELEASED, "released", actor) for r in rows)


def finish(
    session: Session,
    settings: Settings,
    row: Allocation,
    state: str,
    reason: str,
    actor: str,
    notify_holder: bool = True,
) -> bool:
    """Move an active allocation to `state` with a conditional update; False if another
    process already ended it. Records the event and tells the holder."""
    now = utcnow()
    result = session.execute(
        update(Allocation)
        .where(Allocation.id == row.id, Allocation.state == ACTIVE)
        .values(state=state, released_at=now, release_reason=reason, released_by=actor)
        .execution_options(synchronize_session=False)
    )
    if not result.rowcount:  # type: ignore[attr-defined]
        session.refresh(row)
        return False
    session.refresh(row)
    events.record(
        session,
        state,
        actor,
        f"allocation {row.id} (GPU {row.gpu_id} on {row.host}) of {row.user} {state}: {reason}",
        user=row.user,
        host=row.host,
        gpu_id=row.gpu_id,
        allocation_id=row.id,
        data={"reason": reason},
    )
    if notify_holder:
        by = "" if actor in (row.user, "agent", "policy") else f" by {actor}"
        notify(
            session,
            settings,
            state,
            f"Your GPU {row.gpu_id} ({row.gpu_type}) on {row.host} was {state}{by}: {reason}.",
            users=[row.user],
        )
    return True


def reset(db: Database, settings: Settings, actor: str) -> int:
    """Admin: end every active allocation; the agent then restores the access baseline."""
    if not settings.is_admin(actor):
        raise Forbidden("only admins can reset GPULocker")
    with db.transaction() as session:
        rows = session.scalars(select(Allocation).where(Allocation.state == ACTIVE)).all()
        ended = sum(finish(session, settings, r, REVOKED, "reset", actor) for r in rows)
        events.record(session, "reset", actor, f"reset: {ended} allocation(s) ended")
    return ended


def mark_access_applied(session: Session, allocation_id: int, at: datetime | None = None) -> bool:
    """The agent granted the holder access on the device file. True the first time."""
    result = session.execute(
        update(Allocation)
        .where(Allocation.id == allocation_id, Allocation.access_applied_at.is_(None))
        .values(access_applied_at=at or utcnow())
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]
