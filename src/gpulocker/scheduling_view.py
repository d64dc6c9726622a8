"""What one scheduling pass knows, read once: the line, every type's plans, who holds what.

A pass reads all it decides on in one read session (a fixed handful of queries, none per
request), decides in memory, and writes only what changes: grants, and what is due
(expiries, reminders, booking starts). The checks here are the rules of an immediate
request (maintenance, lockouts, quotas, bookings, silent hosts) applied to the numbers
read once; they only spare the pass write transactions that would be refused. Every
grant checks all of them again inside its own transaction (scheduler.grant), so a
picture gone stale costs a refused grant, never a wrong one.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from gpulocker import capacity, fairshare, hosts, lockouts, maintenance, queue, quotas
from gpulocker.capacity import HostPlan
from gpulocker.config import Settings
from gpulocker.db import Database
from gpulocker.errors import Quota
from gpulocker.models import Allocation

Shape = tuple[int, float]  # (count, hours) of a request


@dataclass
class TypeLine:
    """One GPU type's part of a pass: its plans and the requests blocked so far.

    A request blocked (too few GPUs now) bounds the backfill: a later request is granted
    ahead of it only if it ends before the moment the blocked one is sure to have its
    GPUs; with several blocked, the earliest of those moments. Answers are cached by
    shape (count, hours), since every request of one shape gets the same answer until
    the next grant of the type.
    """

    plans: dict[str, HostPlan]
    now: datetime
    blocked: set[Shape] = field(default_factory=set)
    _fits: dict[Shape, bool] = field(default_factory=dict)
    _bound: datetime | None = None
    _bound_of: set[Shape] = field(default_factory=set)  # the shapes _bound covers

    def fits(self, count: int, hours: float) -> bool:
        """Whether `count` GPUs on one host are free now and for `hours`."""
        shape = (count, hours)
        if shape not in self._fits:
            end = self.now + timedelta(hours=hours)
            self._fits[shape] = any(
                len(p.free_now) >= count and p.fits(self.now, end, count)
                for p in self.plans.values()
            )
        return self._fits[shape]

    def block(self, count: int, hours: float) -> None:
        """A request of this shape waits: later ones must not delay it."""
        self.blocked.add((count, hours))

    def delays_blocked(self, hours: float) -> bool:
        """Whether a grant for `hours` from now would end after a blocked one's sure start."""
        for shape in self.blocked - self._bound_of:
            start = capacity.sure_start(self.plans, self.now, *shape)
            if start is not None and (self._bound is None or start < self._bound):
                self._bound = start
            self._bound_of.add(shape)
        return self._bound is not None and self.now + timedelta(hours=hours) > self._bound

    def took(self, rows: list[Allocation]) -> None:
        """Count a grant: its GPUs are no longer free, until the grant's end."""
        self.plans[rows[0].host].take({r.gpu_id for r in rows}, rows[0].expires_at)
        self.changed()

    def changed(self, plans: dict[str, HostPlan] | None = None) -> None:
        """Forget every cached answer (the plans changed, or were read again)."""
        if plans is not None:
            self.plans = plans
        self._fits.clear()
        self._bound, self._bound_of = None, set()


@dataclass
class Rules:
    """What the rules of a request read (maintenance, lockouts, quotas), for the users
    in the line. Read only when a request first fits: most passes grant nothing."""

    maintenance: bool
    locked_out: set[str]
    limits: dict[str, quotas.Limits]
    week: dict[str, float]  # GPU-hours this week, of users with a gpu_hours_per_week


@dataclass
class PassView:
    """Everything a pass decides on, read at `now` (see the module docstring)."""

    now: datetime
    line: list[queue.Waiting]  # waiting requests whose wait has not ended, in serving order
    due: list[int]  # waiting requests whose wait has ended
    types: dict[str, TypeLine]
    silent: set[str]  # hosts whose agent is silent: their GPUs are not granted
    to_remind: bool  # a booking's holders are due a reminder
    to_start: list[int]  # bookings whose start has come, soonest first
    held: Counter[str]  # GPUs each user holds
    rules: Rules | None = None

    def refusal(self, db: Database, settings: Settings, row: queue.Waiting) -> str | None:
        """Why the rules refuse `row` now, whatever is free (None: they do not)."""
        if self.rules is None:
            with db.session() as session:
                self.rules = read_rules(session, settings, self.now, {r.user for r in self.line})
        rules = self.rules
        if rules.maintenance and not settings.is_admin(row.requested_by):
            return "maintenance mode"
        if row.user in rules.locked_out:
            return "locked out"
        limits, held, used = rules.limits[row.user], self.held[row.user], rules.week.get(row.user)
        try:
            quotas.judge(row.user, limits, row.count, row.hours, held, used)
        except Quota as exc:
            return exc.message
        return None

    def granted(self, row: queue.Waiting, rows: list[Allocation]) -> None:
        """Count a grant of `row` (its allocations `rows`) in the picture."""
        self.types[row.gpu_type].took(rows)
        self.held[row.user] += len(rows)
        if self.rules is not None and row.user in self.rules.week:
            self.rules.week[row.user] += row.count * row.hours


def read_rules(session: Session, settings: Settings, now: datetime, users: set[str]) -> Rules:
    """The rules' numbers for `users`, in at most four queries."""
    limits = {u: quotas.limits_for(settings, u) for u in users}
    weekly = [u for u in users if limits[u].gpu_hours_per_week is not None]
    return Rules(
        maintenance=maintenance.enabled(session),
        locked_out={lock.user for lock in lockouts.all_active(session, now)},
        limits=limits,
        week=quotas.week_usage_many(session, weekly, now),
    )


def read_type(session: Session, gpu_type: str, silent: set[str], now: datetime) -> TypeLine:
    """One type's plans read again (after a refused grant: the picture was stale)."""
    plans = capacity.build(capacity.read(session, gpu_type), leave_out=silent)
    return TypeLine(plans.get(gpu_type, {}), now)


def load(session: Session, settings: Settings, now: datetime) -> PassView:
    """Read what a pass decides on, once: six queries however long the line."""
    rows = capacity.read(session)
    silent = hosts.silent_hosts(session, settings, now)
    plans = capacity.build(rows, leave_out=silent)
    waiting = queue.read_line(session, settings, now)
    line = [r for r in waiting if not r.due]
    running = [(a.user, a.created_at, a.expires_at) for a in rows.active]
    usage = fairshare.usage(session, settings, now, {r.user for r in line}, running)
    soon = now + timedelta(minutes=settings.expiry_reminder_minutes)
    starts = sorted((b.start_at, b.id) for b in rows.booked if b.start_at <= now)
    return PassView(
        now=now,
        line=queue.in_order(line, usage),
        due=[r.id for r in waiting if r.due],
        types={t: TypeLine(p, now) for t, p in plans.items()},
        silent=silent,
        to_remind=any(b.unreminded and b.start_at <= soon for b in rows.booked),
        to_start=[rid for _start, rid in starts],
        held=Counter(a.user for a in rows.active),
    )
