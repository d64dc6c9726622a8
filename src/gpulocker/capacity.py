"""What each host can promise, now and later: the timeline the scheduler and bookings read.

A host's plan for one GPU type: its healthy GPUs, the end of every active allocation on
them and the booked reservations. The load at a moment is the allocations still running
then plus the reservations covering it; a window fits `count` more GPUs when the load
never passes the capacity minus `count` during it. The load only rises at a reservation's
start, so checking the window's start and the reservation starts inside it is enough.

Every write that changes a type's future (a grant, a booking, an extension) first takes
`lock_type`, so two of them never decide on the same stale picture: SQLite runs writers
one at a time (BEGIN IMMEDIATE), PostgreSQL gets a transaction-scoped advisory lock per
GPU type. The database, not the process, serializes them.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence, Set
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import Connection, bindparam, case, func, select, text
from sqlalchemy.orm import Session

from gpulocker import hosts as gpu_hosts
from gpulocker.config import Settings
from gpulocker.errors import NotEnoughGPUs
from gpulocker.models import ACTIVE, BOOKED, Allocation, Gpu
from gpulocker.scheduling_models import Reservation


def lock_type(session: Session, gpu_type: str) -> None:
    """Serialize, until this transaction ends, every writer deciding about `gpu_type`."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(
            text("SELECT pg_advisory_xact_lock(hashtext(:key))"),
            {"key": f"gpulocker:type:{gpu_type}"},
        )


class Slot(NamedTuple):
    """A free GPU as a grant needs it (a plain row, not an ORM object)."""

    host: str
    gpu_id: int
    gpu_type: str
    device: str


@dataclass
class HostPlan:
    """One host's GPUs of one type: capacity, running allocations' ends, bookings.

    The load is a step function of time, built once (`_steps`): `loads[i]` GPUs are in use
    or promised during [times[i], times[i + 1]), `base` before times[0].
    """

    host: str
    capacity: int
    free_now: list[Slot] = field(default_factory=list)  # by GPU id
    ends: list[datetime] = field(default_factory=list)  # active allocations' expires_at
    bookings: list[tuple[datetime, datetime, int]] = field(default_factory=list)
    _times: list[datetime] | None = None
    _loads: list[int] = field(default_factory=list)

    def _steps(self) -> list[datetime]:
        if self._times is None:
            deltas: dict[datetime, int] = {}
            for end in self.ends:
                deltas[end] = deltas.get(end, 0) - 1
            for start, end, count in self.bookings:
                deltas[start] = deltas.get(start, 0) + count
                deltas[end] = deltas.get(end, 0) - count
            self._times = sorted(deltas)
            load, self._loads = len(self.ends), []
            for moment in self._times:
                load += deltas[moment]
                self._loads.append(load)
        return self._times

    def load(self, at: datetime) -> int:
        """GPUs in use or promised at moment `at` (allocations started before now)."""
        i = bisect_right(self._steps(), at) - 1
        return len(self.ends) if i < 0 else self._loads[i]

    def _first_over(self, start: datetime, limit: int) -> tuple[datetime, datetime | None] | None:
        """The first stretch from `start` on where the load passes `limit`: (from, until)."""
        times = self._steps()
        i = bisect_right(times, start) - 1
        if self.load(start) > limit:
            j = i + 1
            while j < len(times) and self._loads[j] > limit:
                j += 1
            return start, times[j] if j < len(times) else None
        for k in range(i + 1, len(times)):
            if self._loads[k] > limit:
                j = k + 1
                while j < len(times) and self._loads[j] > limit:
                    j += 1
                return times[k], times[j] if j < len(times) else None
        return None

    def fits(self, start: datetime, end: datetime, count: int) -> bool:
        """Whether `count` more GPUs are free at every moment of [start, end)."""
        if count > self.capacity:
            return False
        over = self._first_over(start, self.capacity - count)
        return over is None or over[0] >= end

    def earliest(self, start: datetime, hours: float, count: int) -> datetime | None:
        """The first moment from `start` when `count` GPUs are free for `hours`."""
        if count > self.capacity:
            return None
        length = timedelta(hours=hours)
        moment: datetime | None = start
        while moment is not None:
            over = self._first_over(moment, self.capacity - count)
            if over is None or over[0] >= moment + length:
                return moment
            moment = over[1]
        return None

    def take(self, gpu_ids: Set[int], until: datetime) -> None:
        """Count a grant of `gpu_ids` until `until` (the pass's picture after it grants)."""
        self.free_now = [g for g in self.free_now if g.gpu_id not in gpu_ids]
        self.ends.extend(until for _ in gpu_ids)
        self._times = None

    def free_until(self, start: datetime, count: int) -> datetime | None:
        """Until when `count` more GPUs stay free from `start` (None: nothing ends it)."""
        over = self._first_over(start, self.capacity - count)
        return over[0] if over is not None else None


class GpuRow(NamedTuple):
    host: str
    gpu_id: int
    gpu_type: str
    device: str
    healthy: bool


class ActiveRow(NamedTuple):
    id: int
    user: str
    host: str
    gpu_id: int
    gpu_type: str
    created_at: datetime
    expires_at: datetime


class BookedRow(NamedTuple):
    id: int
    user: str
    host: str
    gpu_type: str
    start_at: datetime
    end_at: datetime
    count: int  # type: ignore[assignment]  # a field, where tuples have a method
    unreminded: bool  # its holders have not been reminded yet


@dataclass
class Rows:
    """What every plan is made of, read in three queries: managed GPUs, active
    allocations, booked reservations (of all types, or of one). Plain tuples: a pass
    reads a thousand rows, and ORM objects or SQLAlchemy rows cost several times more."""

    gpus: list[GpuRow]
    active: list[ActiveRow]
    booked: list[BookedRow]


def _plan_statements(one_type: bool) -> tuple[Any, Any, Any]:
    g, a, r = Gpu, Allocation, Reservation
    gpus = select(g.host, g.gpu_id, g.gpu_type, g.device, g.healthy).where(
        g.error.is_distinct_from("not managed")
    )
    active = select(a.id, a.user, a.host, a.gpu_id, a.gpu_type, a.created_at, a.expires_at)
    unreminded = r.reminded_at.is_(None).label("unreminded")
    booked = select(r.id, r.user, r.host, r.gpu_type, r.start_at, r.end_at, r.count, unreminded)
    active, booked = active.where(a.state == ACTIVE), booked.where(r.state == BOOKED)
    if one_type:
        gpus = gpus.where(g.gpu_type == bindparam("gpu_type"))
        active = active.where(a.gpu_type == bindparam("gpu_type"))
        booked = booked.where(r.gpu_type == bindparam("gpu_type"))
    return gpus.order_by(g.host, g.gpu_id), active, booked


# Built once: a statement built anew for every call costs more (building the expression,
# its cache key) than running it on a small table.
_PLANS = {one: _plan_statements(one) for one in (False, True)}


def read(session: Session, gpu_type: str | None = None) -> Rows:
    """The rows of `gpu_type`'s plans (every type's when None)."""
    gpus, active, booked = _PLANS[gpu_type is not None]
    params = {"gpu_type": gpu_type}
    run = session.connection().execute  # Core rows: no ORM loading for plain columns
    return Rows(
        list(map(GpuRow._make, run(gpus, params).all())),
        list(map(ActiveRow._make, run(active, params).all())),
        list(map(BookedRow._make, run(booked, params).all())),
    )


def build(
    rows: Rows, exclude_reservation: int | None = None, leave_out: Set[str] = frozenset()
) -> dict[str, dict[str, HostPlan]]:
    """Per type, every host's plan (hosts in `leave_out` left out), from `rows`."""
    result: dict[str, dict[str, HostPlan]] = {}
    taken = {(a.host, a.gpu_id) for a in rows.active}
    for host, gpu_id, gpu_type, device, healthy in rows.gpus:
        if host in leave_out:
            continue
        plan = result.setdefault(gpu_type, {}).get(host)
        if plan is None:
            plan = result[gpu_type][host] = HostPlan(host, 0)
        if healthy:
            plan.capacity += 1
            if (host, gpu_id) not in taken:
                plan.free_now.append(Slot(host, gpu_id, gpu_type, device))
    for a in rows.active:
        holding = result.get(a.gpu_type, {}).get(a.host)
        if holding is not None:
            holding.ends.append(a.expires_at)
    for b in rows.booked:
        booked = result.get(b.gpu_type, {}).get(b.host)
        if booked is not None and b.id != exclude_reservation:
            booked.bookings.append((b.start_at, b.end_at, b.count))
    return result


def plans(
    session: Session, gpu_type: str, exclude_reservation: int | None = None
) -> dict[str, HostPlan]:
    """Every host's plan for `gpu_type`, from the database as it is now."""
    return build(read(session, gpu_type), exclude_reservation).get(gpu_type, {})


def sure_start(
    host_plans: dict[str, HostPlan], now: datetime, count: int, hours: float
) -> datetime | None:
    """The moment a request for `count` GPUs for `hours` is sure to have them (None: never)."""
    starts = [p.earliest(now, hours, count) for p in host_plans.values()]
    known = [s for s in starts if s is not None]
    return min(known) if known else None


def choose(
    session: Session,
    settings: Settings,
    gpu_type: str,
    count: int,
    hours: float,
    now: datetime,
    gpu_ids: Sequence[int] | None = None,
) -> list[Slot]:
    """Pick free GPUs on one host (this host first) that no booking needs during the
    allocation, or refuse saying how many are free and, when a booking is in the way,
    until when they are free."""
    silent = gpu_hosts.silent_hosts(session, settings)  # their agents are not answering
    note = gpu_hosts.silence_note(silent, settings)
    host_plans = {h: p for h, p in plans(session, gpu_type).items() if h not in silent}
    end = now + timedelta(hours=hours)
    free = [g for p in host_plans.values() for g in p.free_now]
    hosts = sorted(
        host_plans, key=lambda h: (h != settings.gpu_host, -len(host_plans[h].free_now), h)
    )
    until: datetime | None = None
    for host in hosts:
        plan = host_plans[host]
        if gpu_ids is not None:
            picked = [g for g in plan.free_now if g.gpu_id in set(gpu_ids)]
        else:
            picked = plan.free_now[:count]
        if len(picked) < count:
            continue
        if plan.fits(now, end, count):
            return picked
        limit = plan.free_until(now, count)
        if limit is not None and (until is None or limit > until):
            until = limit
    if until is not None:
        raise NotEnoughGPUs(
            f"{count} {gpu_type} GPU(s) are free only until {until:%Y-%m-%d %H:%M} UTC "
            "(booked after that): ask for fewer hours",
            free=len(free),
            until=until.isoformat(),
        )
    if gpu_ids is not None:
        wanted = set(gpu_ids)
        busy = sorted(wanted - {g.gpu_id for g in free})
        raise NotEnoughGPUs(
            f"GPU(s) {busy} of type {gpu_type!r} are not free "
            f"({len(free)} {gpu_type} GPU(s) free{note})",
            free=len(free),
        )
    raise too_few(gpu_type, count, len(free), note)


def too_few(gpu_type: str, count: int, free: int, note: str) -> NotEnoughGPUs:
    """The refusal when no host has `count` GPUs free now (`free` in all, `note` on the
    silent hosts left out)."""
    if free >= count:
        return NotEnoughGPUs(
            f"{free} {gpu_type} GPU(s) are free but not {count} on one host{note}", free=free
        )
    return NotEnoughGPUs(
        f"not enough free {gpu_type} GPUs: asked for {count}, {free} free{note}", free=free
    )


_FREE_PER_HOST = (
    select(
        Gpu.host,
        func.count(case((Gpu.healthy.is_(True) & Allocation.id.is_(None), 1))),
    )
    .outerjoin(
        Allocation,
        (Allocation.host == Gpu.host)
        & (Allocation.gpu_id == Gpu.gpu_id)
        & (Allocation.state == ACTIVE),
    )
    .where(Gpu.gpu_type == bindparam("gpu_type"), Gpu.error.is_distinct_from("not managed"))
    .group_by(Gpu.host)
)  # one row per host that has the type, with how many of its GPUs are free


def shortage(
    conn: Connection, settings: Settings, gpu_type: str, count: int
) -> NotEnoughGPUs | None:
    """The refusal `choose` would raise when no host has `count` GPUs of the type free
    now, from one count per host; None when some host has enough, or the type is unknown
    (`choose` decides, bookings and all). For a request whose turn came after others took
    the GPUs: a refusal that costs a small read instead of a write transaction. Two Core
    statements on a plain connection: it runs in the turn, while the others wait."""
    rows = conn.execute(_FREE_PER_HOST, {"gpu_type": gpu_type}).all()
    if not rows:  # an unknown type: the full check says so
        return None
    silent = gpu_hosts.silent_hosts(conn, settings)
    free = {host: n for host, n in rows if host not in silent}
    if any(n >= count for n in free.values()):
        return None
    return too_few(gpu_type, count, sum(free.values()), gpu_hosts.silence_note(silent, settings))
