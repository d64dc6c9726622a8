"""How fast is one GPU's 7-day history with 7 days x 64 GPUs of one-minute samples?

Fills a fresh SQLite file and a fresh PostgreSQL database with 645,120 `gpu_samples`
rows, then times `history.series(..., hours=168)` for one GPU (downsampled in SQL to at
most 1000 points) against a baseline measured in the same run: fetching the same window's
raw rows into Python and averaging them there. Target: < 50 ms on both databases.

    .venv/bin/python bench/bench_history.py [--postgres URL] [--skip-postgres]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from sqlalchemy import insert, select

from benchlib import POSTGRES, postgres_database
from gpulocker import history
from gpulocker.db import Database
from gpulocker.models import GpuSample, utcnow

GPUS = 64
DAYS = 7
HOST = "bench"
RUNS = 15


def fill(db: Database, end_minutes_ago: int = 0) -> int:
    """One sample per GPU per minute for DAYS days, ending now."""
    now = utcnow().replace(second=0, microsecond=0)
    minutes = DAYS * 24 * 60
    total = 0
    batch: list[dict[str, object]] = []
    with db.transaction() as session:
        for minute in range(minutes):
            at = now - timedelta(minutes=minutes - minute)
            for gpu in range(GPUS):
                batch.append(
                    {
                        "host": HOST,
                        "gpu_id": gpu,
                        "at": at,
                        "utilization": float((minute * 7 + gpu) % 101),
                        "memory_used_mib": float((minute * 13 + gpu * 100) % 24000),
                        "holder": None if gpu % 3 else "alice",
                        "processes": gpu % 4,
                    }
                )
            if len(batch) >= 20000:
                session.execute(insert(GpuSample), batch)
                total += len(batch)
                batch = []
        if batch:
            session.execute(insert(GpuSample), batch)
            total += len(batch)
    return total


def settle(db: Database) -> None:
    """What the database does on its own soon after a bulk load (autovacuum on PostgreSQL):
    update statistics and, on PostgreSQL, the visibility map that index-only scans use."""
    with db.engine.connect() as conn:
        if db.is_sqlite:
            conn.exec_driver_sql("ANALYZE")
            conn.commit()
        else:
            conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql(
                "VACUUM ANALYZE gpu_samples"
            )


def baseline(db: Database, gpu_id: int, hours: float) -> int:
    """Fetch every raw row of the window and average into 1000 buckets in Python."""
    end = utcnow()
    start = end - timedelta(hours=hours)
    with db.session() as session:
        rows = session.execute(
            select(GpuSample.at, GpuSample.utilization, GpuSample.memory_used_mib)
            .where(GpuSample.host == HOST, GpuSample.gpu_id == gpu_id, GpuSample.at >= start)
            .order_by(GpuSample.at)
        ).all()
    width = (end - start) / 1000
    buckets: dict[int, list[float]] = {}
    for at, util, _mem in rows:
        buckets.setdefault(int((at - start) / width), []).append(util)
    return len(buckets)


def timed(func: object, *args: object) -> tuple[float, object]:
    """Median milliseconds over RUNS calls (after one warm-up) and the last result."""
    result = func(*args)  # type: ignore[operator]
    times = []
    for _ in range(RUNS):
        began = time.perf_counter()
        result = func(*args)  # type: ignore[operator]
        times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times), result


def measure(label: str, url: str) -> None:
    db = Database(url)
    db.upgrade()
    began = time.perf_counter()
    rows = fill(db)
    print(f"{label}: filled {rows:,} rows in {time.perf_counter() - began:.1f} s")
    settle(db)

    def query() -> int:
        with db.session() as session:
            return len(history.series(session, HOST, 17, 24 * DAYS))

    fast_ms, points = timed(query)
    slow_ms, buckets = timed(baseline, db, 17, 24.0 * DAYS)
    print(
        f"{label}: 7-day history of one GPU: {fast_ms:.1f} ms median ({points} points) | "
        f"baseline raw fetch + Python: {slow_ms:.1f} ms ({buckets} buckets) | "
        f"ratio {slow_ms / fast_ms:.1f}x faster | target < 50 ms: "
        f"{'met' if fast_ms < 50 else 'NOT met'}"
    )
    db.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgres", default=POSTGRES)
    parser.add_argument("--skip-postgres", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        measure("sqlite", f"sqlite:///{Path(tmp) / 'bench.db'}")
    if args.skip_postgres:
        return 0
    with postgres_database(args.postgres) as url:
        measure("postgresql", url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
