"""GPU history: sampling (every GPU_ACTIVITY_CHECK_MINUTES the agent stores each GPU's
utilization, memory, holder and process count, and drops rows older than
GPU_UTILIZATION_HISTORY_DAYS) and the queries over those rows (charts).

The rows feed the history charts and the idle policy. Only fresh, healthy readings are
stored: a failed GPU or a stale reading leaves a gap, and a gap never counts as idle.

For charts, `series` averages the `gpu_samples` rows of a time window into at most
`MAX_POINTS` time buckets so a week of samples stays a small answer. The averaging happens
in the database (GROUP BY the bucket number of each row), so a week of one-minute samples
costs one index range scan and sends at most MAX_POINTS rows to Python;
`bench/bench_history.py` measures it against fetching the raw rows.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Float, Integer, cast, delete, func, select
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from gpulocker.config import Settings
from gpulocker.context import Context
from gpulocker.gpus import GpuSample as LiveSample
from gpulocker.hostview import HostView
from gpulocker.models import ACTIVE, Allocation, GpuSample, utcnow

log = logging.getLogger(__name__)

MAX_POINTS = 1000
UNIX_EPOCH_JULIAN_DAY = 2440587.5

# --- sampling (the agent's history step)


def max_sample_age(settings: Settings) -> timedelta:
    """How old a live reading may be and still count as "now" (a few sampling periods)."""
    return timedelta(seconds=max(3 * settings.gpus_status_refresh_rate_seconds, 30.0))


def record(
    ctx: Context, host: str, samples: Iterable[LiveSample], now: datetime | None = None
) -> int:
    """Store one history row per healthy, fresh sample of `host`'s GPUs. Returns the count."""
    now = now or utcnow()
    fresh = [
        s
        for s in samples
        if s.ok and s.utilization is not None and now - s.at <= max_sample_age(ctx.settings)
    ]
    if not fresh:
        return 0
    with ctx.db.transaction() as session:
        active = select(Allocation.gpu_id, Allocation.user).where(
            Allocation.host == host, Allocation.state == ACTIVE
        )
        holders = {gpu_id: user for gpu_id, user in session.execute(active)}
        session.add_all(
            GpuSample(
                host=host,
                gpu_id=s.index,
                at=s.at,
                utilization=float(s.utilization or 0.0),
                memory_used_mib=float(s.memory_used_mib or 0.0),
                holder=holders.get(s.index),
                processes=len(s.processes),
            )
            for s in fresh
        )
    return len(fresh)


def prune(ctx: Context, host: str, gpu_ids: Iterable[int], now: datetime | None = None) -> int:
    """Delete `host`'s rows older than the retention, GPU by GPU (so the index is used)."""
    cutoff = (now or utcnow()) - timedelta(days=ctx.settings.gpu_utilization_history_days)
    deleted = 0
    with ctx.db.transaction() as session:
        for gpu_id in gpu_ids:
            result = session.execute(
                delete(GpuSample).where(
                    GpuSample.host == host, GpuSample.gpu_id == gpu_id, GpuSample.at < cutoff
                )
            )
            deleted += result.rowcount  # type: ignore[attr-defined]
    return deleted


PRUNE_SECONDS = 3600.0  # the step prunes at most this often: the retention is in days


def history_step(agent: HostView, prune_old: bool = True) -> bool:
    """Agent step: record the newest samples and (`prune_old`) prune old rows. True if it
    wrote anything."""
    written = record(agent.ctx, agent.host, list(agent.samples.values()))
    pruned = prune(agent.ctx, agent.host, list(agent.samples)) if prune_old else 0
    if pruned:
        log.info(
            "pruned %d history rows older than %g days",
            pruned,
            agent.settings.gpu_utilization_history_days,
        )
    return bool(written or pruned)


def history_every(settings: Settings) -> float:
    """The history step's period in seconds (GPU_ACTIVITY_CHECK_MINUTES)."""
    return settings.gpu_activity_check_minutes * 60.0


class HistoryStep:
    """Agent step: store the newest readings every GPU_ACTIVITY_CHECK_MINUTES; prune rows
    past the retention every PRUNE_SECONDS (one DELETE per GPU: not at every run)."""

    name = "history"

    def __init__(self) -> None:
        self._prune_at = 0.0

    def every(self, settings: Settings) -> float:
        return history_every(settings)

    def run(self, view: HostView) -> bool:
        now = time.monotonic()
        due = now >= self._prune_at
        if due:
            self._prune_at = now + PRUNE_SECONDS
        return history_step(view, prune_old=due)


# --- queries (charts)


def series(
    session: Session,
    host: str,
    gpu_id: int,
    hours: float,
    max_points: int = MAX_POINTS,
    end: datetime | None = None,
) -> list[dict[str, Any]]:
    """Points `{at, utilization, memory_used_mib}` oldest first, at most `max_points`: each
    the mean of one bucket (window / max_points wide) and the time of its newest sample."""
    end = end or utcnow()
    start = end - timedelta(hours=hours)
    width = max((end - start).total_seconds() / max(1, max_points), 1e-6)
    bucket = _bucket(session, start, width)
    stmt = (
        select(
            func.max(GpuSample.at),
            func.avg(GpuSample.utilization),
            func.avg(GpuSample.memory_used_mib),
        )
        .where(
            GpuSample.host == host,
            GpuSample.gpu_id == gpu_id,
            GpuSample.at >= start,
            GpuSample.at <= end,
        )
        .group_by(bucket)
        .order_by(bucket)
    )
    return [_point(at, util, mem) for at, util, mem in session.execute(stmt) if at is not None]


def _bucket(session: Session, start: datetime, width: float) -> ColumnElement[Any]:
    """The bucket number of a row: whole widths between the window's start and its time."""
    start_epoch = start.astimezone(UTC).timestamp()
    if session.get_bind().dialect.name == "sqlite":
        epoch = (func.julianday(GpuSample.at) - UNIX_EPOCH_JULIAN_DAY) * 86400.0
        return cast((epoch - start_epoch) / width, Integer)  # rows are after start: trunc = floor
    epoch_pg = cast(func.extract("epoch", GpuSample.at), Float)
    return func.floor((epoch_pg - start_epoch) / width)


def _point(at: datetime, utilization: float, memory_used_mib: float) -> dict[str, Any]:
    return {
        "at": at.isoformat(),
        "utilization": round(float(utilization), 2),
        "memory_used_mib": round(float(memory_used_mib), 1),
    }
