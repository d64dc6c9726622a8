"""Scale: 8 GPU hosts x 32 GPUs, 2,000 users and a year of allocation history, beside one
host x 32 GPUs with 250 users and an eighth of that history (the same lab, one host), in
the same run, on PostgreSQL (several hosts need it).

Figures, medians (41 calls of each page, 15 agent ticks), each against the one-host
figure (goal: within 2x):
- `/api/gpu_status` as an admin, the status cache emptied before each call (the
  uncached answer: one snapshot of every GPU with its holder and live sample);
- the dashboard (`/`) of a user who holds a GPU, and the admin events page
  (`/admin/events`, newest page);
- one agent tick (every step except `disk`, forced) of a host with 32 simulated GPUs, as
  CPU milliseconds; then the same with 5,000 extra processes on the host (sleeping
  `sleep`s), goal under 50 ms.

Needs root (the agent sets ACLs on its simulated device files).

    .venv/bin/python bench/bench_scale.py [--postgres URL] [--processes 5000]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import psycopg
from sqlalchemy import insert

from benchlib import POSTGRES, postgres_database
from gpulocker import accounts, heartbeat, tokens
from gpulocker.agent.loop import Agent
from gpulocker.config import Settings
from gpulocker.context import Context
from gpulocker.db import Database
from gpulocker.gpus import GpuInfo
from gpulocker.inventory import TypedGpu, register
from gpulocker.models import ACTIVE, Allocation, Event, utcnow
from gpulocker.web import create_app
from gpulocker.web.session import CSRF_FIELD
from gpulocker.web.status_cache import CHANGES

REPEATS = 15
WEB_REPEATS = 41  # the pages take 5-15 ms: on a shared machine a median of 15 still jumps
GPUS_PER_HOST = 32
# Signing in needs a real account in good standing (accounts.standing): the admin and the
# dashboard's user are two that exist on every Linux host. USER holds a GPU and has
# history like any of the generated users (it is the first of them).
ADMIN = "root"
USER = "daemon"
STEPS: list[dict[str, float]] = []  # per step CPU ms of each measured agent, in order


def fill(db: Database, hosts: int, users: int, allocations: int) -> None:
    """Inventory, heartbeats, a year of ended allocations (2 events each), half the GPUs held."""
    now = utcnow()
    rng = random.Random(hosts)
    with db.transaction() as session:
        for h in range(hosts):
            infos = [
                GpuInfo(i, "NVIDIA H100", i, f"/dev/nvidia{i}", 81920) for i in range(GPUS_PER_HOST)
            ]
            register(session, f"h{h}", [TypedGpu(g, "h100") for g in infos])
            heartbeat.beat(session, heartbeat.agent_name(f"h{h}"), {"tick_ms": 1.0})
    names = [USER] + [f"user{u:04d}" for u in range(1, users)]
    rows, events = [], []
    for i in range(allocations):
        start = now - timedelta(seconds=rng.uniform(3600, 365 * 86400))
        host, gpu = f"h{rng.randrange(hosts)}", rng.randrange(GPUS_PER_HOST)
        user = rng.choice(names)
        end = start + timedelta(hours=rng.uniform(0.5, 24))
        rows.append(
            {
                "user": user,
                "host": host,
                "gpu_id": gpu,
                "gpu_type": "h100",
                "device": f"/dev/nvidia{gpu}",
                "created_at": start,
                "expires_at": end,
                "released_at": end,
                "release_reason": "released",
                "state": "released",
                "access_applied_at": start,
                "access_removed_at": end,
            }
        )
        for kind, at in (("granted", start), ("released", end)):
            events.append(
                {
                    "at": at,
                    "kind": kind,
                    "actor": user,
                    "user": user,
                    "host": host,
                    "gpu_id": gpu,
                    "allocation_id": None,
                    "message": f"GPU {gpu} on {host} {kind} ({i})",
                    "data": None,
                }
            )
    for h in range(hosts):  # half of every host's GPUs are held now
        for gpu in range(0, GPUS_PER_HOST, 2):
            user = names[(h * GPUS_PER_HOST + gpu) % users]
            rows.append(
                {
                    "user": user,
                    "host": f"h{h}",
                    "gpu_id": gpu,
                    "gpu_type": "h100",
                    "device": f"/dev/nvidia{gpu}",
                    "created_at": now,
                    "expires_at": now + timedelta(hours=8),
                    "state": ACTIVE,
                    "access_applied_at": now,
                }
            )
    with db.transaction() as session:
        for chunk in range(0, len(rows), 5000):
            session.execute(insert(Allocation), rows[chunk : chunk + 5000])
        for chunk in range(0, len(events), 5000):
            session.execute(insert(Event), events[chunk : chunk + 5000])
    with psycopg.connect(db.url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute("ANALYZE")


def median_ms(call: Callable[[], object], repeats: int = WEB_REPEATS) -> float:
    call()  # warm
    took = []
    for _ in range(repeats):
        began = time.perf_counter()
        call()
        took.append(time.perf_counter() - began)
    return statistics.median(took) * 1000


def web_figures(ctx: Context) -> dict[str, float]:
    # The lab's 2,000 users are rows, not Linux accounts: let their sessions stand (the
    # per-use account check is one passwd lookup, the same at any scale).
    accounts.standing = lambda user, *args, **kwargs: accounts.OK  # type: ignore[assignment]
    app = create_app(ctx=ctx)
    app.config.update(TESTING=True)
    client = app.test_client()
    _row, raw = tokens.create(ctx.db, ADMIN, "bench")
    bearer = {"Authorization": f"Bearer {raw}"}

    def status() -> None:
        app.extensions[CHANGES].bump()  # as after a write: the cached answer is stale
        answer = client.get("/api/gpu_status", headers=bearer)
        assert answer.status_code == 200, answer.status_code

    def page_for(user: str, path: str) -> Callable[[], None]:
        browser = app.test_client()
        _r, token = tokens.create(ctx.db, user, "bench", kind=tokens.WEB, hours=1)
        with browser.session_transaction() as session:
            session["token"], session["user"], session[CSRF_FIELD] = token, user, "x"

        def get() -> None:
            answer = browser.get(path)
            assert answer.status_code == 200, (path, answer.status_code)

        return get

    return {
        "/api/gpu_status": median_ms(status),
        "dashboard": median_ms(page_for(USER, "/")),
        "admin events": median_ms(page_for(ADMIN, "/admin/events")),
    }


def tick_ms(ctx: Context, workdir: Path) -> float:
    settings = ctx.settings.with_overrides(
        gpu_host="h0",
        gpu_backend="simulated",
        gpu_config={"h100": list(range(GPUS_PER_HOST))},
        device_dir=workdir / "dev",
    )
    agent = Agent(Context(settings))
    agent.steps = [s for s in agent.steps if s.name != "disk"]
    agent.tick(force=True)
    took = []
    for _ in range(REPEATS):
        began = time.process_time()
        agent.tick(force=True)
        took.append(time.process_time() - began)
    spent: dict[str, list[float]] = {}
    for _ in range(5):
        for step in agent.steps:
            began = time.process_time()
            step.run(agent)
            spent.setdefault(step.name, []).append(time.process_time() - began)
    STEPS.append({k: statistics.median(v) * 1000 for k, v in spent.items()})
    agent.close()
    agent.ctx.close()
    return statistics.median(took) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgres", default=POSTGRES)
    parser.add_argument("--processes", type=int, default=5000)
    parser.add_argument("--allocations", type=int, default=100_000)
    args = parser.parse_args()
    logging.getLogger("gpulocker").setLevel(logging.ERROR)
    labs = {"one host": (1, 250, args.allocations // 8), "8 hosts": (8, 2000, args.allocations)}
    figures: dict[str, dict[str, float]] = {}
    ticks: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory(prefix="glbench-") as tmp, contextlib.ExitStack() as stack:
        contexts = {}
        for label, (hosts, users, allocs) in labs.items():
            url = stack.enter_context(postgres_database(args.postgres))
            settings = Settings(
                state_dir=Path(tmp) / label.replace(" ", "-"),
                database_url=url,
                gpu_host="web",
                privileged_users=(ADMIN,),
                secret_key="bench",
            )
            ctx = Context(settings)
            ctx.db.upgrade()
            began = time.perf_counter()
            fill(ctx.db, hosts, users, allocs)
            print(
                f"{label}: {hosts} x {GPUS_PER_HOST} GPUs, {users} users, {allocs} past "
                f"allocations, {2 * allocs} events (filled in {time.perf_counter() - began:.0f} s)"
            )
            contexts[label] = ctx
            figures[label] = web_figures(ctx)
        for label, ctx in contexts.items():
            base = Path(tmp) / f"agent-{label.replace(' ', '-')}"
            base.mkdir()
            ticks[label] = (tick_ms(ctx, base), 0.0)
        print(f"starting {args.processes} sleeping processes on this host ...")
        procs = [subprocess.Popen(["sleep", "900"]) for _ in range(args.processes)]
        try:
            for label, ctx in contexts.items():
                base = Path(tmp) / f"agent2-{label.replace(' ', '-')}"
                base.mkdir()
                ticks[label] = (ticks[label][0], tick_ms(ctx, base))
        finally:
            for proc in procs:
                proc.kill()
            for proc in procs:
                proc.wait()
        for ctx in contexts.values():
            ctx.close()
    one, many = figures["one host"], figures["8 hosts"]
    print(
        f"\nmedian of {WEB_REPEATS} (pages) and {REPEATS} (ticks), ms (8 hosts / one host; goal <= 2x)"
    )
    for name in one:
        ratio = many[name] / one[name]
        print(f"  {name:16s} one host {one[name]:8.2f} | 8 hosts {many[name]:8.2f} | {ratio:5.2f}x")
    (t1, t1p), (t8, t8p) = ticks["one host"], ticks["8 hosts"]
    print(f"  {'agent tick CPU':16s} one host {t1:8.2f} | 8 hosts {t8:8.2f} | {t8 / t1:5.2f}x")
    print(
        f"  agent tick CPU with {args.processes} more processes: one host {t1p:.2f} ms | "
        f"8 hosts {t8p:.2f} ms | {'<' if t8p < 50 else '>='} 50 ms goal"
    )
    for label, steps in zip(
        ["one host", "8 hosts", "one host + processes", "8 hosts + processes"], STEPS, strict=False
    ):
        top = sorted(steps.items(), key=lambda kv: -kv[1])[:5]
        print(f"    steps, {label}: " + ", ".join(f"{k} {v:.1f}" for k, v in top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
