"""The scheduler as a step of the agent: one pass at a time across hosts, woken by change.

Every agent runs this step each second (reading the newest event id only when the agent
saw the database change, `HostView.change_count`), but a pass runs only when there is
something to do: a new event (every release, expiry, grant, booking and queued request records one,
on any host), or the next moment a booking starts, a holder must be reminded of one, or
a wait runs out, or at the latest SCHEDULER_IDLE_SECONDS after the last pass. The lease
`scheduler` makes one process the scheduler at a time; if it dies another agent takes
over when the lease ends. Grants stay correct without the lease (scheduler.grant), the
lease only keeps hosts from doing the same work twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from gpulocker import lease, scheduler
from gpulocker.config import Settings
from gpulocker.hostview import HostView
from gpulocker.models import BOOKED, WAITING, Event, utcnow
from gpulocker.scheduling_models import QueuedRequest, Reservation

LEASE = "scheduler"
LEASE_SECONDS = 30.0
SCHEDULER_IDLE_SECONDS = 60.0


@dataclass
class Wake:
    """When this process's scheduler should run next."""

    token: int | None = None
    due: datetime | None = None
    heard: int | None = None  # the agent's change count when the token was read


_WAKE: dict[int, Wake] = {}


def scheduler_every(settings: Settings) -> float:
    """How often an agent looks whether a pass is due (one cheap read)."""
    return 1.0


def next_due(session: Session, settings: Settings, now: datetime) -> datetime:
    """The next moment a pass has work without any event: a booking's reminder or start,
    or a wait running out; at the latest SCHEDULER_IDLE_SECONDS from now."""
    soonest = now + timedelta(seconds=SCHEDULER_IDLE_SECONDS)
    start = session.scalar(
        select(func.min(Reservation.start_at)).where(
            Reservation.state == BOOKED, Reservation.reminded_at.is_not(None)
        )
    )
    remind = session.scalar(
        select(func.min(Reservation.start_at)).where(
            Reservation.state == BOOKED, Reservation.reminded_at.is_(None)
        )
    )
    wait = session.scalar(
        select(func.min(QueuedRequest.wait_until)).where(QueuedRequest.state == WAITING)
    )
    if remind is not None:
        remind -= timedelta(minutes=settings.expiry_reminder_minutes)
    for moment in (start, remind, wait):
        if moment is not None:
            soonest = min(soonest, moment)
    return soonest


def scheduler_step(agent: HostView) -> bool:
    """Agent step: run a scheduling pass if one is due and this process holds the lease."""
    db, settings = agent.ctx.db, agent.settings
    wake = _WAKE.setdefault(id(agent), Wake())
    now = utcnow()
    heard = agent.change_count()
    if heard is not None and heard == wake.heard and wake.due is not None and now < wake.due:
        return False  # the agent saw no new event since the last read: no read needed
    with db.session() as session:
        token = session.scalar(select(func.max(Event.id)))
    wake.heard = heard
    if token == wake.token and wake.due is not None and now < wake.due:
        return False
    if not lease.acquire(db, LEASE, LEASE_SECONDS):
        wake.token, wake.due = token, now + timedelta(seconds=LEASE_SECONDS / 3)
        return False
    result = scheduler.run_pass(db, settings, now)
    with db.session() as session:
        wake.token = session.scalar(select(func.max(Event.id)))  # the pass's own events
        wake.due = next_due(session, settings, utcnow())
    return bool(result.granted or result.started or result.expired or result.failed)


class SchedulerStep:
    """Agent step: a scheduling pass when one is due (see the module docstring)."""

    name = "scheduler"

    def every(self, settings: Settings) -> float:
        return scheduler_every(settings)

    def run(self, view: HostView) -> bool:
        return scheduler_step(view)
