"""Utilization and memory history of one GPU, for charts: the `gpu_samples` rows of a
time window, averaged into at most `MAX_POINTS` buckets so a week of samples stays a
small answer."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from gpulocker.models import GpuSample, utcnow

MAX_POINTS = 1000


def series(
    session: Session, host: str, gpu_id: int, hours: float, max_points: int = MAX_POINTS
) -> list[dict[str, Any]]:
    """Points `{at, utilization, memory_used_mib}` oldest first, at most `max_points`."""
    end = utcnow()
    start = end - timedelta(hours=hours)
    stmt = (
        select(GpuSample.at, GpuSample.utilization, GpuSample.memory_used_mib)
        .where(GpuSample.host == host, GpuSample.gpu_id == gpu_id, GpuSample.at >= start)
        .order_by(GpuSample.at)
    )
    rows = session.execute(stmt).all()
    if len(rows) <= max_points:
        return [_point(at, util, mem) for at, util, mem in rows]
    width = (end - start) / max_points
    buckets: dict[int, list[tuple[Any, float, float]]] = {}
    for at, util, mem in rows:
        index = min(max_points - 1, int((at - start) / width))
        buckets.setdefault(index, []).append((at, util, mem))
    return [_average(buckets[i]) for i in sorted(buckets)]


def _point(at: Any, utilization: float, memory_used_mib: float) -> dict[str, Any]:
    return {"at": at.isoformat(), "utilization": utilization, "memory_used_mib": memory_used_mib}


def _average(rows: list[tuple[Any, float, float]]) -> dict[str, Any]:
    """One bucket as one point: the time of its last sample, the mean of its values."""
    count = len(rows)
    return _point(
        rows[-1][0],
        sum(r[1] for r in rows) / count,
        sum(r[2] for r in rows) / count,
    )
