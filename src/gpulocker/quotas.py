"""Quotas (SPEC section 11): GPU-hours per rolling week and GPUs at once, per user or group.

QUOTAS names users and Unix groups ("@students"). A user entry wins over groups; among the
user's groups the most generous value wins; MAX_GPUS_PER_USER is the default `max_gpus`.
A week's usage counts the hours held in the last 7 days, the rest of every running
allocation until its end, and every booked reservation.
"""

from __future__ import annotations

import contextlib
import grp
import pwd
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from gpulocker.config import Settings
from gpulocker.errors import Quota
from gpulocker.models import ACTIVE, BOOKED, Allocation
from gpulocker.scheduling_models import Reservation

WEEK = timedelta(days=7)


@dataclass(frozen=True)
class Limits:
    """A user's limits; None means no limit."""

    gpu_hours_per_week: float | None
    max_gpus: int | None

    def to_dict(self) -> dict[str, float | int | None]:
        return {"gpu_hours_per_week": self.gpu_hours_per_week, "max_gpus": self.max_gpus}


def groups_of(user: str) -> set[str]:
    """The Unix groups `user` belongs to (primary and supplementary)."""
    names = {g.gr_name for g in grp.getgrall() if user in g.gr_mem}
    with contextlib.suppress(KeyError):
        names.add(grp.getgrgid(pwd.getpwnam(user).pw_gid).gr_name)
    return names


def limits_for(settings: Settings, user: str) -> Limits:
    """The limits QUOTAS gives `user` (see the module docstring for the rules)."""
    quotas = settings.quotas
    default_max = settings.max_gpus_per_user
    own = quotas.get(user, {})
    group_entries = []
    if any(name.startswith("@") for name in quotas):
        group_entries = [quotas["@" + g] for g in sorted(groups_of(user)) if "@" + g in quotas]

    def pick(key: str) -> float | None:
        if key in own:
            return own[key]
        values = [entry[key] for entry in group_entries if key in entry]
        return max(values) if values else None

    hours = pick("gpu_hours_per_week")
    gpus = pick("max_gpus")
    return Limits(hours, int(gpus) if gpus is not None else default_max)


def week_usage(session: Session, user: str, now: datetime) -> float:
    """GPU-hours of `user` in the rolling week: held since now - 7 days, running until
    their end, and booked."""
    since = now - WEEK
    end = func.coalesce(Allocation.released_at, Allocation.expires_at)
    rows = session.execute(
        select(Allocation.created_at, end).where(Allocation.user == user, end > since)
    )
    total = sum((stop - max(start, since)).total_seconds() for start, stop in rows)
    booked = session.execute(
        select(Reservation.start_at, Reservation.end_at, Reservation.count).where(
            Reservation.user == user, Reservation.state == BOOKED
        )
    )
    total += sum((stop - start).total_seconds() * count for start, stop, count in booked)
    return total / 3600


def held_now(session: Session, user: str) -> int:
    """GPUs `user` holds now."""
    stmt = select(func.count()).where(Allocation.user == user, Allocation.state == ACTIVE)
    return session.scalar(stmt) or 0


def check(
    session: Session, settings: Settings, user: str, count: int, hours: float, now: datetime
) -> None:
    """Refuse (403 `quota`) a request of `count` GPUs for `hours` that would pass a limit."""
    limits = limits_for(settings, user)
    held = held_now(session, user) if limits.max_gpus is not None else None
    used = week_usage(session, user, now) if limits.gpu_hours_per_week is not None else None
    judge(user, limits, count, hours, held, used)


def check_hours(
    session: Session,
    settings: Settings,
    user: str,
    count: int,
    hours: float,
    now: datetime,
    limits: Limits | None = None,
) -> None:
    """Refuse GPU-hours past `gpu_hours_per_week` (bookings are checked by this alone)."""
    limits = limits or limits_for(settings, user)
    if limits.gpu_hours_per_week is not None:
        judge(user, limits, count, hours, None, week_usage(session, user, now))


def judge(
    user: str, limits: Limits, count: int, hours: float, held: int | None, used: float | None
) -> None:
    """The rule itself, on numbers already read: `held` GPUs now, `used` GPU-hours this
    week (None: that limit is not checked). Raises Quota when `count` more GPUs for
    `hours` would pass a limit."""
    if limits.max_gpus is not None and held is not None and held + count > limits.max_gpus:
        raise Quota(
            f"{user} holds {held} GPU(s); at most {limits.max_gpus} per user "
            "(quota max_gpus, MAX_GPUS_PER_USER)",
            usage={"gpus": held},
            limits=limits.to_dict(),
        )
    week = limits.gpu_hours_per_week
    if week is not None and used is not None and used + count * hours > week + 1e-9:
        raise Quota(
            f"{user} has used {used:.1f} of {week:g} GPU-hours this "
            f"week; {count * hours:g} more would pass the quota (gpu_hours_per_week)",
            usage={"gpu_hours_week": round(used, 3)},
            limits=limits.to_dict(),
        )


def week_usage_many(session: Session, users: Iterable[str], now: datetime) -> dict[str, float]:
    """week_usage for many users in two queries (the scheduling pass)."""
    wanted = sorted(set(users))
    totals = dict.fromkeys(wanted, 0.0)
    if not wanted:
        return totals
    since = now - WEEK
    end = func.coalesce(Allocation.released_at, Allocation.expires_at)
    held = select(Allocation.user, Allocation.created_at, end).where(
        Allocation.user.in_(wanted), end > since
    )
    for user, start, stop in session.execute(held):
        totals[user] += (stop - max(start, since)).total_seconds() / 3600
    r = Reservation
    booked = select(r.user, r.start_at, r.end_at, r.count).where(
        r.user.in_(wanted), r.state == BOOKED
    )
    for user, start, stop, count in session.execute(booked):
        totals[user] += (stop - start).total_seconds() * count / 3600
    return totals


def summary(session: Session, settings: Settings, user: str, now: datetime) -> dict[str, object]:
    """Usage and limits for /api/v1/me."""
    return {
        "gpus": held_now(session, user),
        "gpu_hours_week": round(week_usage(session, user, now), 3),
        "limits": limits_for(settings, user).to_dict(),
    }
