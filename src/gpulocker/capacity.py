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
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from gpulocker import hosts as gpu_hosts
from gpulocker import inventory
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


@dataclass
class HostPlan:
    """One host's GPUs of one type: capacity, running allocations' ends, bookings.

    The load is a step function of time, built once (`_steps`): `loads[i]` GPUs are in use
    or promised during [times[i], times[i + 1]), `base` before times[0].
    """

    host: str
    capacity: int
    free_now: list[Gpu] = field(default_factory=list)
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

    def free_until(self, start: datetime, count: int) -> datetime | None:
        """Until when `count` more GPUs stay free from `start` (None: nothing ends it)."""
        over = self._first_over(start, self.capacity - count)
        return over[0] if over is not None else None


def plans(
    session: Session, gpu_type: str, exclude_reservation: int | None = None
) -> dict[str, HostPlan]:
    """Every host's plan for `gpu_type`, from the database as it is now."""
    result: dict[str, HostPlan] = {}
    gpus = session.scalars(
        select(Gpu).where(Gpu.gpu_type == gpu_type, Gpu.error.is_distinct_from("not managed"))
    ).all()
    for gpu in gpus:
        plan = result.setdefault(gpu.host, HostPlan(gpu.host, 0))
        plan.capacity += int(gpu.healthy)
    for gpu in inventory.free_gpus(session, gpu_type):
        if gpu.host in result:
            result[gpu.host].free_now.append(gpu)
    ends = session.execute(
        select(Allocation.host, Allocation.expires_at).where(
            Allocation.gpu_type == gpu_type, Allocation.state == ACTIVE
        )
    )
    for host, end in ends:
        if host in result:
            result[host].ends.append(end)
    booked = session.execute(
        select(
            Reservation.id,
            Reservation.host,
            Reservation.start_at,
            Reservation.end_at,
            Reservation.count,
        ).where(Reservation.gpu_type == gpu_type, Reservation.state == BOOKED)
    )
    for rid, host, start, end, count in booked:
        if host in result and rid != exclude_reservation:
            result[host].bookings.append((start, end, count))
    return result


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
) -> list[Gpu]:
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
    if len(free) >= count:
        raise NotEnoughGPUs(
            f"{len(free)} {gpu_type} GPU(s) are free but not {count} on one host{note}",
            free=len(free),
        )
    raise NotEnoughGPUs(
        f"not enough free {gpu_type} GPUs: asked for {count}, {len(free)} free{note}",
        free=len(free),
    )
