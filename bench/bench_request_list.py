"""How long does `GET /api/v1/requests` (scheduling_ops.request_list) take for a user with
300 granted requests? The dashboard's queue.js asks it every second or two while a request
waits.

Times, RUNS times each, on a fresh SQLite file:

- `request_list` as it is: the allocations of every granted request in one query and the
  GPU UUIDs of all of them in another;
- the same answer built as before, each request looking up its allocations and UUIDs in
  sessions of its own (checked to give the same answer);
- the baseline, in the same run: a plain read of the user's request rows.

    .venv/bin/python bench/bench_request_list.py
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import event, select

from gpulocker import allocations, queue
from gpulocker import scheduling_ops as ops
from gpulocker.config import Settings
from gpulocker.context import Context
from gpulocker.db import Database, upgrade
from gpulocker.gpus.simulated import SimulatedBackend
from gpulocker.inventory import register, types_from_config
from gpulocker.models import Allocation, utcnow
from gpulocker.scheduling_models import QueuedRequest

REQUESTS = 300
RUNS = 15
CONFIG = {"4090": [0, 1, 2, 3]}


def fill(folder: Path) -> Context:
    """A database with REQUESTS granted requests of user `u`, one allocation each."""
    url = f"sqlite:///{folder}/bench.db"
    upgrade(Database(url).engine)
    settings = Settings(
        state_dir=folder / "state",
        database_url=url,
        gpu_backend="simulated",
        gpu_config=CONFIG,
        device_dir=folder,
        gpu_host="h",
        secret_key="bench",
    )
    ctx = Context(settings)
    now = utcnow()
    with ctx.db.transaction() as session:
        inventory = SimulatedBackend(CONFIG, folder, "h").inventory()
        register(session, "h", types_from_config(CONFIG, inventory))
        for i in range(REQUESTS):
            gpu = i % 4
            row = Allocation(
                user="u",
                host="h",
                gpu_id=gpu,
                gpu_type="4090",
                device=f"/dev/nvidia{gpu}",
                created_at=now,
                expires_at=now,
                released_at=now,
                state="released",
            )
            session.add(row)
            session.flush()
            session.add(
                QueuedRequest(
                    user="u",
                    requested_by="u",
                    gpu_type="4090",
                    count=1,
                    hours=1,
                    state="granted",
                    created_at=now,
                    wait_until=now + timedelta(hours=1),
                    ended_at=now,
                    host="h",
                    allocation_ids=[row.id],
                )
            )
    return ctx


def one_by_one(ctx: Context, actor: str) -> dict[str, Any]:
    """The answer as it was built before: a session per request, twice."""
    rows = queue.list_for(ctx.db, ctx.settings, actor)
    places = ops._places(ctx)
    out = []
    for row in rows:
        record = row.to_dict(places.get(row.id))
        if row.allocation_ids:
            with ctx.db.session() as session:
                stmt = select(Allocation).where(Allocation.id.in_(row.allocation_ids))
                held = session.scalars(stmt).all()
            record["cuda_visible_devices"] = allocations.cuda_visible_devices(ctx.db, held)
        out.append(record)
    return {"requests": out}


def plain_read(ctx: Context, actor: str) -> object:
    """The baseline: the user's request rows, nothing more."""
    return queue.list_for(ctx.db, ctx.settings, actor)


def main() -> None:
    """Fill, check both give the same answer, time each RUNS times."""
    ctx = fill(Path(tempfile.mkdtemp(prefix="gpulocker-bench-")))
    queries = [0]

    def count(*_args: object) -> None:
        queries[0] += 1

    event.listen(ctx.db.engine, "before_cursor_execute", count)
    assert one_by_one(ctx, "u") == ops.request_list(ctx, "u")
    cases: list[tuple[str, Callable[[Context, str], object]]] = [
        ("baseline: plain read of the rows", plain_read),
        ("before: a session per request", one_by_one),
        ("request_list now", ops.request_list),
    ]
    medians = {}
    for name, func in cases:
        times = []
        for _ in range(RUNS):
            queries[0] = 0
            began = time.perf_counter()
            func(ctx, "u")
            times.append(time.perf_counter() - began)
        medians[name] = statistics.median(times)
        print(f"{name:36s} median {medians[name] * 1000:7.1f} ms, {queries[0]:5d} queries")
    base = medians["baseline: plain read of the rows"]
    print(f"before / baseline: {medians['before: a session per request'] / base:.1f}x")
    print(f"now / baseline:    {medians['request_list now'] / base:.1f}x")
    ctx.close()


if __name__ == "__main__":
    main()
