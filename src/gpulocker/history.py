"""Utilization and memory history of one GPU, for charts: the `gpu_samples` rows of a
time window, averaged into at most `MAX_POINTS` time buckets so a week of samples stays a
small answer.

The averaging happens in the database (GROUP BY the bucket number of each row), so a
week of one-minute samples costs one index range scan and sends at most MAX_POINTS rows
to Python; `bench/bench_history.py` measures it against fetching the raw rows.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Float, Integer, cast, func, select
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from gpulocker.models import GpuSample, utcnow

MAX_POINTS = 1000
UNIX_EPOCH_JULIAN_DAY = 2440587.5


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
