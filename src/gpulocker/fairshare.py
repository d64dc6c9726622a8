"""Fair-share usage: GPU-hours held, each hour weighted by 0.5 ** (age / half life).

An allocation held from `s` to `e` (or until now) counts the integral of
0.5 ** ((now - t) / H) over [s, e], which is H / ln 2 * (w(e) - w(s)) with
w(t) = 0.5 ** ((now - t) / H). Allocations that ended more than 20 half-lives ago weigh
less than a millionth and are not read.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from gpulocker.config import Settings
from gpulocker.models import Allocation


def weighted_hours(start: datetime, end: datetime, now: datetime, half_life_hours: float) -> float:
    """The decayed GPU-hours of one GPU held from `start` to `end` (capped at now)."""
    end = min(end, now)
    if end <= start:
        return 0.0

    def weight(at: datetime) -> float:
        return 0.5 ** ((now - at).total_seconds() / 3600 / half_life_hours)

    return half_life_hours / math.log(2) * (weight(end) - weight(start))


def usage(
    session: Session, settings: Settings, now: datetime, users: Iterable[str] | None = None
) -> dict[str, float]:
    """Each user's fair-share usage now (decayed GPU-hours); users with none are absent."""
    half_life = settings.fairshare_half_life_hours
    horizon = now - timedelta(hours=20 * half_life)
    end = func.coalesce(Allocation.released_at, Allocation.expires_at)
    stmt = select(Allocation.user, Allocation.created_at, end).where(end > horizon)
    if users is not None:
        wanted = list(set(users))
        if not wanted:
            return {}
        stmt = stmt.where(Allocation.user.in_(wanted))
    totals: dict[str, float] = {}
    for user, start, stop in session.execute(stmt):
        totals[user] = totals.get(user, 0.0) + weighted_hours(start, stop, now, half_life)
    return totals
