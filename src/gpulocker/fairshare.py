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
from typing import Any

from sqlalchemy import bindparam, func, or_, select
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


Held = tuple[str, datetime, datetime]  # (user, start, end) of one GPU held

# Per database: (when, sums of allocations that had ended by then). Ended allocations
# only decay, by 0.5 ** (elapsed / H) all alike, so a pass reads only what changed since.
_CLOSED: dict[str, tuple[datetime, float, dict[str, float]]] = {}
REFRESH = timedelta(minutes=10)


_ENDED_SINCE = select(Allocation.user, Allocation.created_at, Allocation.released_at).where(
    Allocation.released_at > bindparam("since")
)  # built once (see capacity._PLANS)


def _sums(
    session: Session,
    settings: Settings,
    now: datetime,
    since: datetime | None,
    running: Iterable[Held] | None = None,
) -> dict[str, float]:
    half_life = settings.fairshare_half_life_hours
    end = func.coalesce(Allocation.released_at, Allocation.expires_at)
    stmt: Any = select(Allocation.user, Allocation.created_at, end)
    params: dict[str, datetime] = {}
    if since is None:
        stmt = stmt.where(end > now - timedelta(hours=20 * half_life))
    elif running is None:  # still running, or ended after `since`
        stmt = stmt.where(or_(Allocation.released_at.is_(None), Allocation.released_at > since))
    else:  # the running ones were read already: only those ended after `since` (every pass)
        stmt, params = _ENDED_SINCE, {"since": since}
    totals: dict[str, float] = {}
    rows = session.connection().execute(stmt, params).all()
    for user, start, stop in [*rows, *(running or ())]:
        totals[user] = totals.get(user, 0.0) + weighted_hours(start, stop, now, half_life)
    return totals


def usage(
    session: Session,
    settings: Settings,
    now: datetime,
    users: Iterable[str] | None = None,
    running: Iterable[Held] | None = None,
) -> dict[str, float]:
    """Each user's fair-share usage now (decayed GPU-hours); users with none are absent.
    `running`: every active allocation as (user, created_at, expires_at), when the caller
    has read them already (the scheduling pass)."""
    half_life = settings.fairshare_half_life_hours
    key = f"{session.get_bind().engine.url}:{half_life}"
    cached = _CLOSED.get(key)
    if cached is None or not cached[0] <= now < cached[0] + REFRESH:
        closed = _sums(session, settings, now, None)
        # Only allocations released before `now` are final; keep those.
        live = _sums(session, settings, now, now)
        for user, value in live.items():
            closed[user] = closed.get(user, 0.0) - value
        _CLOSED[key] = cached = (now, half_life, closed)
    at, _h, closed = cached
    factor = 0.5 ** ((now - at).total_seconds() / 3600 / half_life)
    totals = {user: value * factor for user, value in closed.items()}
    for user, value in _sums(session, settings, now, at, running).items():
        totals[user] = totals.get(user, 0.0) + value
    if users is not None:
        wanted = set(users)
        totals = {u: v for u, v in totals.items() if u in wanted}
    return {u: v for u, v in totals.items() if v > 1e-12}
