"""The policies that end allocations on their own: expiry (with a grace while the holder
still works), idle revocation, and the "expiring soon" reminder. SPEC section 5.

Policies only decide and write the database (`allocations.finish`); the agent of the
GPU's host then revokes access and kills the former holder's processes. Which processes
the holder has comes from the live samples every agent publishes, so one runner (chosen
through a lease) can decide for every host. When a GPU's live reading is missing or stale
the policies assume the holder may still be working: they never take work away on a guess.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from gpulocker import allocations, events, lease, live
from gpulocker.config import Settings
from gpulocker.context import Context
from gpulocker.history import max_sample_age
from gpulocker.hostview import HostView
from gpulocker.models import ACTIVE, EXPIRED, REVOKED, Allocation, GpuSample, utcnow
from gpulocker.notify import notify

log = logging.getLogger(__name__)

EXPIRY_LEASE = "policies-expiry"
IDLE_LEASE = "policies-idle"
EXPIRY_CHECK_SECONDS = 60.0
ACTOR = "policy"
MIB_PER_GB = 1024.0

LiveData = Mapping[tuple[str, int], Mapping[str, Any]]


@dataclass
class Outcome:
    """What one run of the policies did, by allocation id."""

    reminded: list[int] = field(default_factory=list)
    grace: list[int] = field(default_factory=list)
    expired: list[int] = field(default_factory=list)
    idle_warned: list[int] = field(default_factory=list)
    idle_revoked: list[int] = field(default_factory=list)

    @property
    def did_work(self) -> bool:
        """True when anything was written."""
        return any((self.reminded, self.grace, self.expired, self.idle_warned, self.idle_revoked))


def run(
    ctx: Context,
    now: datetime | None = None,
    live_data: LiveData | None = None,
    idle: bool = True,
) -> Outcome:
    """Apply the policies to every active allocation once (the idle one only if `idle`).
    One bad row never stops the rest."""
    now = now or utcnow()
    samples = live.read(ctx) if live_data is None else live_data
    outcome = Outcome()
    with ctx.db.session() as session:
        ids = list(session.scalars(select(Allocation.id).where(Allocation.state == ACTIVE)))
    for allocation_id in ids:
        try:
            with ctx.db.transaction() as session:
                _apply(session, ctx.settings, allocation_id, samples, now, outcome, idle)
        except Exception:  # one broken row must not stop the policies for everyone else
            log.exception("policies failed on allocation %s", allocation_id)
    return outcome


def _apply(
    session: Session,
    settings: Settings,
    allocation_id: int,
    samples: LiveData,
    now: datetime,
    outcome: Outcome,
    idle: bool,
) -> None:
    row = session.get(Allocation, allocation_id)
    if row is None or row.state != ACTIVE:
        return
    processes = holder_processes(settings, samples, row, now)
    if row.expires_at <= now:
        result = expire(session, settings, row, processes, now)
        if result == "expired":
            outcome.expired.append(row.id)
        elif result == "grace":
            outcome.grace.append(row.id)
        return
    if remind(session, settings, row, now):
        outcome.reminded.append(row.id)
    if not idle:
        return
    result = check_idle(session, settings, row, processes, now)
    if result == "revoked":
        outcome.idle_revoked.append(row.id)
    elif result == "warned":
        outcome.idle_warned.append(row.id)


def holder_processes(
    settings: Settings, samples: LiveData, row: Allocation, now: datetime
) -> list[Mapping[str, Any]] | None:
    """The holder's processes on the allocation's GPU per its live reading; None = unknown
    (no reading, a failed GPU, or a reading too old to trust)."""
    data = samples.get((row.host, row.gpu_id))
    if not data or not data.get("ok", True):
        return None
    at = data.get("at")
    taken = datetime.fromisoformat(at) if isinstance(at, str) else at
    if not isinstance(taken, datetime) or now - taken > max_sample_age(settings):
        return None
    return [
        p
        for p in data.get("processes") or []
        if p.get("user") == row.user and not p.get("ignored")  # IGNORED_PROCESSES are not work
    ]


def _busy(processes: Sequence[Mapping[str, Any]] | None) -> bool:
    """Unknown counts as busy: the holder keeps the benefit of the doubt."""
    return processes is None or len(processes) > 0


def _describe(processes: Sequence[Mapping[str, Any]] | None, whose: str = "your") -> str:
    if processes is None:
        return "its processes could not be checked"
    pids = ", ".join(str(p.get("pid")) for p in processes)
    return f"{whose} processes still run there (pid {pids})"


def _mark(
    session: Session, row: Allocation, column: str, value: datetime | None, now: datetime
) -> bool:
    """Set a reminder/warning timestamp only if it still has the value we read (a second
    runner that raced us gets False and sends nothing)."""
    attr = getattr(Allocation, column)
    cond = attr.is_(None) if value is None else attr == value
    result = session.execute(
        update(Allocation)
        .where(Allocation.id == row.id, Allocation.state == ACTIVE, cond)
        .values({column: now})
        .execution_options(synchronize_session=False)
    )
    if result.rowcount:  # type: ignore[attr-defined]
        setattr(row, column, now)
        return True
    return False


def expire(
    session: Session,
    settings: Settings,
    row: Allocation,
    processes: Sequence[Mapping[str, Any]] | None,
    now: datetime,
) -> str | None:
    """Past its end: expire it, unless the holder still works there and the grace
    (EXPIRY_GRACE_HOURS) is not over, in which case warn once. FORCE_REVOKE skips the grace."""
    grace_end = row.expires_at + timedelta(hours=settings.expiry_grace_hours)
    if _busy(processes) and not settings.force_revoke and now < grace_end:
        if row.expiry_warned_at is not None or not _mark(
            session, row, "expiry_warned_at", None, now
        ):
            return None
        message = (
            f"Your GPU {row.gpu_id} ({row.gpu_type}) on {row.host} expired at "
            f"{row.expires_at:%Y-%m-%d %H:%M} UTC, but {_describe(processes)}. Save your work "
            f"or extend it: it will be revoked at {grace_end:%Y-%m-%d %H:%M} UTC."
        )
        notify(session, settings, "expiry_grace", message, users=[row.user])
        events.record(
            session,
            "expiry_grace",
            ACTOR,
            message,
            user=row.user,
            host=row.host,
            gpu_id=row.gpu_id,
            allocation_id=row.id,
            data={"grace_until": grace_end.isoformat()},
        )
        return "grace"
    if allocations.finish(session, settings, row, EXPIRED, "expired", actor=ACTOR):
        return "expired"
    return None


def remind(session: Session, settings: Settings, row: Allocation, now: datetime) -> bool:
    """Tell the holder EXPIRY_REMINDER_MINUTES before the end, once per end time. Not for
    allocations shorter than the reminder itself (the grant message already says the end)."""
    before = timedelta(minutes=settings.expiry_reminder_minutes)
    if not before or row.reminded_at is not None:
        return False
    if not (now < row.expires_at <= now + before) or row.expires_at - row.created_at <= before:
        return False
    if not _mark(session, row, "reminded_at", None, now):
        return False
    minutes = max(1, round((row.expires_at - now).total_seconds() / 60))
    notify(
        session,
        settings,
        "expiring_soon",
        f"Your GPU {row.gpu_id} ({row.gpu_type}) on {row.host} expires at "
        f"{row.expires_at:%Y-%m-%d %H:%M} UTC (in {minutes} min). Extend it if you still need it.",
        users=[row.user],
    )
    return True


def idle_throughout(
    settings: Settings,
    samples: Sequence[tuple[datetime, float, float]],
    start: datetime,
    end: datetime,
) -> bool:
    """True when history covers [start, end] without a gap and every sample is below both
    thresholds. A gap is more than 1.5 sampling periods with no sample: a missed sample is
    not evidence of idleness, so it keeps the allocation."""
    tolerance = timedelta(minutes=1.5 * settings.gpu_activity_check_minutes)
    min_memory_mib = settings.min_gpu_memory_gb * MIB_PER_GB
    previous = start
    for at, utilization, memory_mib in samples:
        if at - previous > tolerance:
            return False
        if utilization >= settings.min_gpu_utilization_percent or memory_mib >= min_memory_mib:
            return False
        previous = at
    return bool(samples) and end - previous <= tolerance


def check_idle(
    session: Session,
    settings: Settings,
    row: Allocation,
    processes: Sequence[Mapping[str, Any]] | None,
    now: datetime,
) -> str | None:
    """Revoke an allocation idle for all of REVOKE_IDLE_GPU_AFTER_HOURS; while the holder
    still has processes there, warn the holder and the admins instead (unless FORCE_REVOKE)."""
    window = timedelta(hours=settings.revoke_idle_gpu_after_hours)
    start = now - window
    if row.created_at > start:
        return None
    samples = session.execute(
        select(GpuSample.at, GpuSample.utilization, GpuSample.memory_used_mib)
        .where(
            GpuSample.host == row.host,
            GpuSample.gpu_id == row.gpu_id,
            GpuSample.at >= start,
            GpuSample.at <= now,
        )
        .order_by(GpuSample.at)
    )
    if not idle_throughout(settings, [(at, u, m) for at, u, m in samples], start, now):
        return None
    hours = f"{settings.revoke_idle_gpu_after_hours:g} h"
    if _busy(processes) and not settings.force_revoke:
        warned = row.idle_warned_at
        if warned is not None and warned > start:
            return None  # already warned within this window
        if not _mark(session, row, "idle_warned_at", warned, now):
            return None
        message = (
            f"GPU {row.gpu_id} ({row.gpu_type}) on {row.host} held by {row.user} has been idle "
            f"for {hours}, but {_describe(processes, 'their')}. "
            "Please release it if it is not needed."
        )
        notify(session, settings, "idle_warning", message, users=[row.user], admins=True)
        events.record(
            session,
            "idle_warning",
            ACTOR,
            message,
            user=row.user,
            host=row.host,
            gpu_id=row.gpu_id,
            allocation_id=row.id,
        )
        return "warned"
    if allocations.finish(session, settings, row, REVOKED, "idle", actor=ACTOR):
        return "revoked"
    return None


def idle_period(settings: Settings) -> float:
    """Seconds between idle checks: CHECK_FOR_IDLE_GPU_HOURS."""
    return settings.check_for_idle_gpu_hours * 3600.0


def expiry_period(settings: Settings) -> float:
    """Seconds between expiry checks: CHECK_FOR_IDLE_GPU_HOURS but at most a minute, so an
    allocation ends at its `expires_at` even with the original app's 2-hour idle period."""
    return min(idle_period(settings), EXPIRY_CHECK_SECONDS)


def policies_every(settings: Settings) -> float:
    """How often an agent asks whether it is its turn (cheap: one conditional UPDATE)."""
    return max(0.5, min(expiry_period(settings) / 4, 15.0))


def slot_seconds(settings: Settings, period: float) -> float:
    """How long one claimed run lasts: the period less half a step, so a step that comes
    back a moment early does not skip a whole period."""
    return period - policies_every(settings) / 2


def policies_step(agent: HostView) -> bool:
    """Agent step: run expiry and reminders, and the idle policy when its period is due, if
    this process wins the period's slot (leases `policies-expiry`, `policies-idle`), so one
    runner acts per period however many agents and hosts there are."""
    db, settings = agent.ctx.db, agent.settings
    if not lease.claim_slot(db, EXPIRY_LEASE, slot_seconds(settings, expiry_period(settings))):
        return False
    idle = lease.claim_slot(db, IDLE_LEASE, slot_seconds(settings, idle_period(settings)))
    return run(agent.ctx, idle=idle).did_work


class PoliciesStep:
    """Agent step: expiry, reminders and the idle policy, one runner per period."""

    name = "policies"

    def every(self, settings: Settings) -> float:
        return policies_every(settings)

    def run(self, view: HostView) -> bool:
        return policies_step(view)
