"""What does the local socket add, and how long does a terminal command take?

1. Operation latency: `status` (8 GPUs, 4 held, live samples published) and
   `allocations.list_for` answered through the agent's Unix socket, one connection per
   request (what every CLI command does) and many requests on one connection. Baseline
   in the same run: the same core calls made directly in one process (the floor).
2. Command wall time: `gpulocker status --json` and `gpulocker list --json` as child
   processes talking to the socket. Baseline in the same run: `python -c "import click"`,
   the least a click command can cost to start.

SQLite in a temporary directory, simulated GPUs, no root needed.

    .venv/bin/python bench/bench_localapi.py [--requests 500] [--runs 20]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from gpulocker import allocations, gpustatus, live
from gpulocker.agent import localapi
from gpulocker.config import Settings
from gpulocker.context import Context, open_context
from gpulocker.gpus.simulated import SimulatedBackend
from gpulocker.inventory import register, types_from_config

GPU_CONFIG = {"4090": [0, 1, 2, 3], "a100": [4, 5, 6, 7]}


def percentiles(samples: list[float]) -> tuple[float, float]:
    """p50 and p99 in milliseconds."""
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return statistics.median(ordered) * 1000, p99 * 1000


def timed(func: Callable[[], object], count: int) -> list[float]:
    """Wall time of `count` calls of `func`, each alone."""
    times = []
    for _ in range(count):
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return times


def setup(base: Path) -> Context:
    """A database with 8 simulated GPUs, 4 of them held, and a published live sample."""
    settings = Settings(
        state_dir=base / "state",
        database_url=f"sqlite:///{base}/bench.db",
        gpu_backend="simulated",
        gpu_config=GPU_CONFIG,
        device_dir=base / "dev",
        gpu_host="benchhost",
        socket_path=base / "gl.sock",
    )
    ctx = open_context(settings)
    backend = SimulatedBackend(settings.gpu_config, settings.device_path)
    with ctx.db.transaction() as session:
        register(session, settings.gpu_host, types_from_config(GPU_CONFIG, backend.inventory()))
    user = os.environ.get("USER") or "root"
    allocations.request(ctx.db, settings, "root" if os.geteuid() == 0 else user, "4090", 2, 4)
    allocations.request(ctx.db, settings, "someone", "a100", 2, 4)
    live.publish(ctx, settings.gpu_host, backend.sample())
    return ctx


class Persistent:
    """Many requests on one connection."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.reader = self.sock.makefile("rb")

    def call(self, op: str, **args: object) -> dict[str, object]:
        self.sock.sendall(json.dumps({"op": op, "args": args}).encode() + b"\n")
        return dict(json.loads(self.reader.readline()))


def bench_operations(ctx: Context, path: Path, requests: int) -> None:
    settings = ctx.settings
    actor = "root" if os.geteuid() == 0 else (os.environ.get("USER") or "root")

    def direct_status() -> object:
        return gpustatus.snapshot(ctx)

    def direct_list() -> object:
        with ctx.db.session() as session:
            return [r.to_dict() for r in allocations.list_for(session, settings, actor)]

    client = localapi_client(path)
    persistent = Persistent(path)
    print(f"{'operation':<22}{'way':<22}{'p50 ms':>9}{'p99 ms':>9}{'ratio':>8}")
    for name, direct, op in [
        ("status (8 GPUs)", direct_status, "status"),
        ("list (2 allocations)", direct_list, "allocations.list_for"),
    ]:
        base50, base99 = percentiles(timed(direct, requests))
        rows = [
            ("direct core call", base50, base99),
            ("socket, new conn.", *percentiles(timed(lambda op=op: client.call(op), requests))),
            (
                "socket, one conn.",
                *percentiles(timed(lambda op=op: persistent.call(op), requests)),
            ),
        ]
        for way, p50, p99 in rows:
            print(f"{name:<22}{way:<22}{p50:>9.2f}{p99:>9.2f}{p50 / base50:>7.2f}x")


def localapi_client(path: Path) -> object:
    from gpulocker.cli.client import SocketClient

    return SocketClient(path)


def bench_commands(path: Path, runs: int) -> None:
    env = {**os.environ, "GPULOCKER_SOCKET": str(path), "XDG_CONFIG_HOME": "/nonexistent"}

    def run(*args: str) -> Callable[[], object]:
        return lambda: subprocess.run(args, env=env, check=True, capture_output=True)

    baseline = timed(run(sys.executable, "-c", "import click"), runs)
    base50 = statistics.median(baseline) * 1000
    print(f"\n{'command':<34}{'p50 ms':>9}{'max ms':>9}{'ratio':>8}")
    for label, times in [
        ('python -c "import click"', baseline),
        (
            "gpulocker status --json",
            timed(run(sys.executable, "-m", "gpulocker", "status", "--json"), runs),
        ),
        (
            "gpulocker list --json",
            timed(run(sys.executable, "-m", "gpulocker", "list", "--json"), runs),
        ),
    ]:
        p50 = statistics.median(times) * 1000
        print(f"{label:<34}{p50:>9.1f}{max(times) * 1000:>9.1f}{p50 / base50:>7.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="glbench-", dir="/tmp") as tmp:
        base = Path(tmp)
        ctx = setup(base)
        server = localapi.start(ctx, base / "gl.sock")
        try:
            bench_operations(ctx, server.path, args.requests)
            bench_commands(server.path, args.runs)
        finally:
            server.close()
            ctx.close()


if __name__ == "__main__":
    main()
