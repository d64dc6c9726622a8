"""Race: N processes at once each ask for 1 GPU of a type that has 8 free.

Prints, per database: granted, refused, errors and per-request latency (p50/p99), beside
two baselines of the same run: the same requests made one after another (their total is
the goal's yardstick: contended p99 within 2x of it), and N processes released at once
that each only read one row (`SELECT 1` through a session): what N Python processes
cost on this machine's cores by themselves, before any allocation logic.
Exactly 8 must be granted and the rest refused with a clear message, on SQLite and
PostgreSQL. Usage: python bench/bench_race.py [--requests 64] [--gpus 8]
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import text

import benchlib
from benchlib import postgres_database
from gpulocker import allocations
from gpulocker.config import Settings
from gpulocker.db import Database
from gpulocker.errors import NotEnoughGPUs
from gpulocker.gpus import GpuInfo
from gpulocker.inventory import TypedGpu, register


@contextlib.contextmanager
def fresh_database(kind: str, workdir: Path) -> Iterator[str]:
    """A new, empty database (a SQLite file in `workdir`, or one on PostgreSQL)."""
    if kind == "sqlite":
        yield f"sqlite:///{workdir / f'race-{uuid.uuid4().hex[:6]}.db'}"
        return
    with postgres_database() as url:
        yield url


WARM = "warm"  # a GPU type of its own, one GPU per racer, for the warm-up


def prepare(url: str, gpus: int, racers: int) -> Settings:
    settings = Settings(database_url=url, gpu_host="bench", state_dir=Path(tempfile.gettempdir()))
    db = Database(url)
    db.upgrade()
    infos = [GpuInfo(i, "bench", i, f"/dev/nvidia{i}", 1000) for i in range(gpus + racers)]
    types = ["bench"] * gpus + [WARM] * racers
    with db.transaction() as session:
        register(session, "bench", [TypedGpu(g, t) for g, t in zip(infos, types, strict=True)])
    db.dispose()
    return settings


def warm_up(db: Database, settings: Settings, user: str) -> None:
    """Before the start line, serve this process requests as a web worker has served many:
    a grant of a GPU of another type, committed, then released, and a refusal on the read.
    So its connection is open, every statement of a request is compiled and the code and
    data of each step have been touched since the fork. Without it each racer pays those
    first times (several ms of CPU, as much as the request itself) inside the race, which
    the one-after-another baseline, warmed the same way in one process, pays once."""
    (row,) = allocations.request(db, settings, user, WARM, 1, 1)
    allocations.release(db, settings, user, row.id)
    with contextlib.suppress(NotEnoughGPUs):
        allocations.request(db, settings, user, "bench", 999, 1)


@contextlib.contextmanager
def _unserialized(db: Database, key: str, check: Any = None, quick: Any = None) -> Any:
    """The read check, then a plain write transaction: no turns (before Database.serialized)."""
    if check is not None:
        with db.session() as session:
            check(session)
    with db.transaction() as session:
        yield session


def one_request_unlocked(settings: Settings, user: str, barrier: object, out: object) -> None:
    """As `one_request`, without the allocation lock (the code before Database.serialized)."""
    Database.serialized = _unserialized  # type: ignore[method-assign,assignment]
    one_request(settings, user, barrier, out)


def one_request(settings: Settings, user: str, barrier: object, out: object) -> None:
    """A child process: wait for everyone, then ask for one GPU."""
    db = Database(settings.database_url)
    warm_up(db, settings, user)
    barrier.wait()  # type: ignore[attr-defined]
    start = time.perf_counter()
    try:
        allocations.request(db, settings, user, "bench", 1, 1)
        outcome = "granted"
    except NotEnoughGPUs as exc:
        outcome = "refused" if "free" in exc.message else f"error: {exc.message}"
    except Exception as exc:  # a benchmark counts every failure
        outcome = f"error: {type(exc).__name__}: {exc}"
    out.put((outcome, time.perf_counter() - start))  # type: ignore[attr-defined]
    finish(db, barrier)


def finish(db: Database, barrier: object) -> None:
    """Stay until every racer has its answer, then go. A web worker lives on after a
    request; a racer that exited at once would spend the CPU of its interpreter's teardown
    (tens of ms) while the others still wait for their turn, and count against them."""
    barrier.wait()  # type: ignore[attr-defined]
    db.dispose()


def one_trivial(settings: Settings, user: str, barrier: object, out: object) -> None:
    """A child process of the processes-only baseline: wait, then read one row."""
    db = Database(settings.database_url)
    with db.session() as s:
        s.connection()
    barrier.wait()  # type: ignore[attr-defined]
    start = time.perf_counter()
    with db.session() as s:
        s.execute(text("SELECT 1")).scalar()
    out.put(("trivial", time.perf_counter() - start))  # type: ignore[attr-defined]
    finish(db, barrier)


def race(settings: Settings, requests: int, target: Any = None) -> tuple[list[str], list[float]]:
    """Start `requests` racers, release them at once, collect (outcome, seconds) of each.

    Results travel on a SimpleQueue: a racer's put is one write to a pipe, where a Queue
    would start a feeder thread in each racer as it finishes, CPU taken from the racers
    still waiting. The parent only waits for the racers to exit (the pipe holds every
    small result), so it takes no CPU during the race either."""
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(requests)
    out = ctx.SimpleQueue()
    procs = [
        ctx.Process(target=target or one_request, args=(settings, f"racer{i}", barrier, out))
        for i in range(requests)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 120
    for p in procs:
        p.join(max(deadline - time.monotonic(), 0.1))
    if stuck := [p for p in procs if p.is_alive()]:
        for p in stuck:
            p.kill()
        raise RuntimeError(f"{len(stuck)} racer(s) did not finish in 120 s")
    results = []
    while not out.empty():
        results.append(out.get())
    if len(results) != requests:
        raise RuntimeError(f"{requests - len(results)} racer(s) died without an answer")
    return [r[0] for r in results], [r[1] for r in results]


def sequential(settings: Settings, requests: int) -> list[float]:
    """The baseline: the same requests one after another, after a reset."""
    db = Database(settings.database_url)
    admin_settings = settings.with_overrides(privileged_users=("admin",))
    allocations.reset(db, admin_settings, "admin")
    warm_up(db, settings, "seq")
    times = []
    for i in range(requests):
        start = time.perf_counter()
        with contextlib.suppress(NotEnoughGPUs):
            allocations.request(db, settings, f"seq{i}", "bench", 1, 1)
        times.append(time.perf_counter() - start)
    db.dispose()
    return times


def pct(values: list[float], q: float) -> float:
    """The quantile of `values` (seconds) in milliseconds."""
    return benchlib.pct(values, q) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--gpus", type=int, default=8)
    args = parser.parse_args()
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("sqlite", "postgresql"):
            with fresh_database(kind, Path(tmp)) as url:
                settings = prepare(url, args.gpus, args.requests)
                _, trivial = race(settings, args.requests, one_trivial)
                unlocked = race(settings, args.requests, one_request_unlocked)
                db = Database(settings.database_url)
                allocations.reset(db, settings.with_overrides(privileged_users=("a",)), "a")
                db.dispose()
                outcomes, latencies = race(settings, args.requests)
                baseline = sequential(settings, args.requests)
            granted = outcomes.count("granted")
            refused = outcomes.count("refused")
            errors = [o for o in outcomes if o.startswith("error")]
            print(
                f"{kind:10} {args.requests} concurrent requests for 1 of {args.gpus} GPUs: "
                f"granted={granted} refused={refused} errors={len(errors)} | latency "
                f"p50={pct(latencies, 0.5):.1f} ms p99={pct(latencies, 0.99):.1f} ms | "
                f"one-at-a-time baseline p50={pct(baseline, 0.5):.1f} ms "
                f"(ratio p50 contended/baseline {statistics.median(latencies) / statistics.median(baseline):.1f}x)"
            )
            total = sum(baseline) * 1000
            p99 = pct(latencies, 0.99)
            print(
                f"{'':10} one-after-another total {total:.1f} ms | contended p99 / that total "
                f"{p99 / total:.2f}x (goal <= 2x) | {args.requests} processes reading one row "
                f"at once: p50={pct(trivial, 0.5):.1f} ms p99={pct(trivial, 0.99):.1f} ms"
            )
            print(
                f"{'':10} same race without the allocation lock (before): granted="
                f"{unlocked[0].count('granted')} p50={pct(unlocked[1], 0.5):.1f} ms "
                f"p99={pct(unlocked[1], 0.99):.1f} ms | with/without p99 "
                f"{p99 / pct(unlocked[1], 0.99):.2f}x"
            )
            for error in errors[:5]:
                print("   ", error)
            ok &= granted == args.gpus and refused == args.requests - args.gpus and not errors
    print("RESULT:", "ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
