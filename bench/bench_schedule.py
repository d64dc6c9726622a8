"""How long is one scheduling pass with 1,000 waiting requests, 500 bookings and 256 GPUs?

Fills a fresh SQLite file and a fresh PostgreSQL database with 8 hosts x 32 GPUs (two
types, four hosts each), 255 of them held by running allocations ending within 3 days,
500 bookings over the next 30 days, 1,000 waiting requests of 40 users (1-8 GPUs, 1-24 h)
and 4,000 past allocations (the fair-share history). Then times, RUNS times each:

- `scheduler.run_pass`: expire, remind, start due bookings, order the line by fair share
  and try it (the one free GPU per host is booked soon, so nothing is granted and every
  pass does the same work);
- planning the whole line: every waiting request's sure start (capacity.sure_start);
- the baseline, in the same run: a plain read of the same rows (waiting requests,
  bookings, GPUs, active allocations) into Python objects.

Target: pass p99 < 20 ms on both databases.

Before timing, the objects the process made so far (SQLAlchemy, the models, the fill) are
frozen out of Python's cycle collector (`gc.freeze()`, which a long-running agent can do
after its start): otherwise a full collection of those ~100,000 objects (30-50 ms) lands
in a pass now and then and is the p99, whatever the pass costs. The pass's own garbage is
still collected while timed. The frozen objects are unfrozen after each database.

    .venv/bin/python bench/bench_schedule.py [--postgres URL] [--skip-postgres]
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from sqlalchemy import insert, select

from benchlib import POSTGRES, pct, postgres_database
from gpulocker import capacity, queue, scheduler
from gpulocker.config import Settings
from gpulocker.db import Database
from gpulocker.models import ACTIVE, BOOKED, RELEASED, WAITING, Allocation, Gpu, utcnow
from gpulocker.scheduling_models import QueuedRequest, Reservation

HOSTS = 8
PER_HOST = 32
RUNS = 60
USERS = [f"user{i:02d}" for i in range(40)]


def fill(db: Database) -> None:
    rng = random.Random(42)
    now = utcnow()
    gpus, allocs, books, waiting, history = [], [], [], [], []
    for h in range(HOSTS):
        host, gpu_type = f"node{h}", ("a100" if h < 4 else "h100")
        for g in range(PER_HOST):
            dev = f"/dev/nvidia{g}"
            gpus.append(
                dict(
                    host=host,
                    gpu_id=g,
                    gpu_type=gpu_type,
                    name="bench",
                    minor=g,
                    device=dev,
                    memory_total_mib=81920,
                    mig=False,
                    healthy=True,
                    seen_at=now,
                )
            )
            if g < PER_HOST - 1:  # one free GPU per host
                allocs.append(
                    dict(
                        user=rng.choice(USERS),
                        host=host,
                        gpu_id=g,
                        gpu_type=gpu_type,
                        device=dev,
                        created_at=now - timedelta(hours=rng.uniform(0, 48)),
                        expires_at=now + timedelta(hours=rng.uniform(1, 72)),
                        state=ACTIVE,
                    )
                )
        # The free GPU is booked from 30 minutes on, so no request fits it now.
        books.append(
            dict(
                user=rng.choice(USERS),
                booked_by="bench",
                gpu_type=gpu_type,
                count=1,
                host=host,
                start_at=now + timedelta(minutes=30),
                end_at=now + timedelta(hours=30),
                state=BOOKED,
                created_at=now,
            )
        )
    while len(books) < 500:
        h = rng.randrange(HOSTS)
        start = now + timedelta(hours=rng.uniform(80, 30 * 24))
        books.append(
            dict(
                user=rng.choice(USERS),
                booked_by="bench",
                gpu_type=("a100" if h < 4 else "h100"),
                count=rng.choice((1, 2, 4)),
                host=f"node{h}",
                start_at=start,
                end_at=start + timedelta(hours=rng.choice((2, 8, 24))),
                state=BOOKED,
                created_at=now,
            )
        )
    for _i in range(1000):
        created = now - timedelta(hours=rng.uniform(0, 10))
        waiting.append(
            dict(
                user=rng.choice(USERS),
                requested_by="bench",
                gpu_type=rng.choice(("a100", "h100")),
                count=rng.choice((1, 2, 4, 8)),
                hours=float(rng.choice((1, 4, 12, 24))),
                state=WAITING,
                created_at=created,
                wait_until=created + timedelta(hours=24),
            )
        )
    for i in range(4000):
        start = now - timedelta(hours=rng.uniform(50, 24 * 28))
        stop = start + timedelta(hours=rng.uniform(0.5, 48))
        history.append(
            dict(
                user=rng.choice(USERS),
                host=f"node{i % HOSTS}",
                gpu_id=i % PER_HOST,
                gpu_type="a100",
                device="/dev/null",
                created_at=start,
                expires_at=stop,
                released_at=stop,
                state=RELEASED,
            )
        )
    with db.transaction() as session:
        session.execute(insert(Gpu), gpus)
        session.execute(insert(Allocation), allocs + history)
        session.execute(insert(Reservation), books)
        session.execute(insert(QueuedRequest), waiting)


def timed(func: Callable[[], object]) -> tuple[list[float], list[float]]:
    """Wall and CPU milliseconds of RUNS calls (the CPU figure is this process's own: on a
    shared machine it says what the call costs, the wall figure what it took)."""
    func()  # warm caches
    wall, cpu = [], []
    for _ in range(RUNS):
        start, used = time.perf_counter(), time.process_time()
        func()
        wall.append((time.perf_counter() - start) * 1000)
        cpu.append((time.process_time() - used) * 1000)
    return wall, cpu


def report(label: str, times: tuple[list[float], list[float]]) -> float:
    wall, cpu = times
    print(
        f"  {label:<34} p50 {statistics.median(wall):7.2f} ms   p99 {pct(wall, 0.99):7.2f} ms"
        f"   (CPU p50 {statistics.median(cpu):6.2f} ms, p99 {pct(cpu, 0.99):6.2f} ms)"
    )
    return pct(wall, 0.99)


def measure(label: str, url: str) -> None:
    db = Database(url)
    db.upgrade()
    fill(db)
    gc.collect()
    gc.freeze()  # see the module docstring
    settings = Settings(database_url=url, gpu_host="node0")
    now = utcnow()

    def one_pass() -> None:
        result = scheduler.run_pass(db, settings, now)
        assert result.granted == 0 and result.started == 0, result

    def plan_line() -> None:
        with db.session() as session:
            line = queue.ordered(session, settings, now)
            plans = {t: capacity.plans(session, t) for t in ("a100", "h100")}
        for row in line:
            capacity.sure_start(plans[row.gpu_type], now, row.count, row.hours)

    def plain_read() -> None:
        with db.session() as session:
            rows = session.scalars(
                select(QueuedRequest).where(QueuedRequest.state == WAITING)
            ).all()
            rows += session.scalars(select(Reservation).where(Reservation.state == BOOKED)).all()
            rows += session.scalars(select(Gpu)).all()
            rows += session.scalars(select(Allocation).where(Allocation.state == ACTIVE)).all()
            assert len(rows) == 1000 + 500 + 256 + 248

    print(f"{label}: 1000 waiting, 500 bookings, {HOSTS * PER_HOST} GPUs on {HOSTS} hosts")
    base = report("baseline: plain read of the rows", timed(plain_read))
    full = report("scheduler.run_pass", timed(one_pass))
    report("plan the whole line (sure starts)", timed(plan_line))
    verdict = "met" if full < 20 else "NOT met"
    print(f"  pass / plain read (p99): {full / base:.2f}x; target pass p99 < 20 ms: {verdict}")
    db.dispose()
    gc.unfreeze()


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
