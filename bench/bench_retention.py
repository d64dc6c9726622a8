"""What retention costs: the rows-per-table gauge of /metrics, and how long a pruning pass
holds the write lock, each against a baseline measured in the same run.

Fills a fresh SQLite file (and, unless --skip-postgres, a fresh PostgreSQL database) with
ROWS `gpu_samples` rows (64 GPUs, one a minute, half of them older than the retention) and
ROWS / 5 events and notifications, then times:

* `retention.table_rows` against the rest of /metrics (baseline);
* the longest single DELETE of a batched pass (`retention.prune`, 1000 rows a statement)
  against one DELETE of the same rows in one statement (baseline: what pruning without
  batches would hold the write lock for).

    .venv/bin/python bench/bench_retention.py [--rows N] [--postgres URL] [--skip-postgres]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, event, insert, text

from benchlib import POSTGRES, postgres_database
from gpulocker import retention
from gpulocker.config import Settings
from gpulocker.context import Context
from gpulocker.db import upgrade
from gpulocker.models import Event, Gpu, GpuSample, Notification, utcnow
from gpulocker.web import create_app

GPUS = 64
HOST = "bench"


def fill(ctx: Context, rows: int) -> None:
    """Samples one a minute per GPU, the older half beyond GPU_UTILIZATION_HISTORY_DAYS."""
    now = utcnow()
    span = rows // GPUS  # minutes of history per GPU
    with ctx.db.transaction() as session:
        for start in range(0, rows, 50_000):
            session.execute(
                insert(GpuSample),
                [
                    {
                        "host": HOST,
                        "gpu_id": i % GPUS,
                        "at": now - timedelta(minutes=span - i // GPUS),
                        "utilization": 1.0,
                        "memory_used_mib": 2.0,
                    }
                    for i in range(start, min(rows, start + 50_000))
                ],
            )
        few = [{"at": now, "kind": "k", "actor": "a", "message": "a message"}] * (rows // 5)
        session.execute(insert(Event), few)
        notes = [{"user": "u", "kind": "k", "message": "m", "created_at": now}] * (rows // 5)
        session.execute(insert(Notification), notes)


def best(call: Any, runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        call()
        times.append(time.perf_counter() - began)
    return min(times)


def bench(url: str, rows: int, state: Path) -> None:
    days = rows // GPUS / 60 / 24 / 2  # half the history is older than this
    settings = Settings(
        state_dir=state,
        database_url=url,
        secret_key="bench",
        gpu_backend="simulated",
        gpu_utilization_history_days=days,
        revoke_idle_gpu_after_hours=1.0,
    )
    ctx = Context(settings)
    upgrade(ctx.db.engine)
    gpu = {"host": HOST, "gpu_type": "4090", "device": "/dev/null", "seen_at": utcnow()}
    with ctx.db.transaction() as session:
        session.execute(insert(Gpu), [{**gpu, "gpu_id": i, "minor": i} for i in range(GPUS)])
    fill(ctx, rows)
    if not ctx.db.is_sqlite:
        with ctx.db.session() as session:
            session.execute(text("ANALYZE"))
    client = create_app(ctx=ctx).test_client()
    client.get("/metrics")
    counting = best(lambda: retention.table_rows(ctx.db))
    rest = best(lambda: client.get("/metrics"))  # the rows come from the web's 30 s cache
    print(
        f"  table_rows {counting * 1000:.1f} ms; /metrics without it {rest * 1000:.1f} ms"
        f" (ratio {counting / rest:.1f})"
    )

    longest: list[float] = []
    began: dict[str, float] = {}

    def before(*_: Any) -> None:
        began["t"] = time.perf_counter()

    def after(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("DELETE"):
            longest.append(time.perf_counter() - began["t"])

    event.listen(ctx.db.engine, "before_cursor_execute", before)
    event.listen(ctx.db.engine, "after_cursor_execute", after)
    cutoff = utcnow() - timedelta(days=days)
    pruned = 0
    start = time.perf_counter()
    while True:
        result = retention.prune(ctx)
        pruned += result.pruned.get("gpu_samples", 0)
        if result.done:
            break
    batched = time.perf_counter() - start
    event.remove(ctx.db.engine, "after_cursor_execute", after)
    # Baseline: the same number of rows again, deleted in one statement.
    fill(ctx, rows)
    one = time.perf_counter()
    with ctx.db.transaction() as session:
        session.execute(delete(GpuSample).where(GpuSample.at < cutoff))
    single = time.perf_counter() - one
    print(
        f"  pruned {pruned} samples in {batched:.2f} s; longest DELETE {max(longest) * 1000:.1f}"
        f" ms vs one DELETE {single * 1000:.0f} ms (ratio {max(longest) / single:.3f})"
    )
    ctx.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=640_000)
    parser.add_argument("--postgres", default=POSTGRES)
    parser.add_argument("--skip-postgres", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        print(f"SQLite, {args.rows} samples:")
        bench(f"sqlite:///{folder}/bench.db", args.rows, Path(folder))
    if args.skip_postgres:
        return
    print(f"PostgreSQL, {args.rows} samples:")
    with tempfile.TemporaryDirectory() as folder, postgres_database(args.postgres) as url:
        bench(url, args.rows, Path(folder))


if __name__ == "__main__":
    main()
