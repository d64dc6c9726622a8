"""How fast is a chmod on a device file undone? The inotify watch beside the 0.2 s poll.

What nvidia-modprobe does (`chmod 0666` on a fail-closed /dev/nvidiaN) is done ROUNDS
times to a simulated GPU's file while an agent loops in a thread; each time the bench
times until the file reads 0660 again. Two agents in the same run:

- watch: the agent as it runs (`Agent.run`, inotify on the files and DEVICE_DIR);
- poll (baseline): the same agent with inotify unavailable (no watch, no wake-ups), so
  only the 0.2 s stat poll of the reconcile step notices, as before the watch.

Target: every restore under 50 ms with the watch (p99 and max printed).

Needs root (ACLs). SQLite in a temp folder.

    .venv/bin/python bench/bench_watch.py [--rounds 200]
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import stat
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchlib import pct
from gpulocker.agent import wake, watch
from gpulocker.agent.loop import Agent
from gpulocker.config import Settings
from gpulocker.context import open_context
from gpulocker.gpus.simulated import SimulatedBackend, device_file


def restored(path: str) -> bool:
    return stat.S_IMODE(os.stat(path).st_mode) == 0o660


def chmod_loop(base: Path, rounds: int, use_watch: bool) -> list[float]:
    """Seconds from each chmod 0666 until the agent made the file 0660 again."""
    settings = Settings(
        state_dir=base / "state",
        database_url=f"sqlite:///{base}/bench.db",
        gpu_backend="simulated",
        gpu_config={"4090": [0, 1, 2, 3]},
        device_dir=base / "dev",
        gpu_host="bench",
        secret_key="bench",
        reconcile_seconds=3600.0,
    )
    ctx = open_context(settings)
    SimulatedBackend(settings.gpu_config, settings.device_path).inventory()
    agent = Agent(ctx)
    stop = threading.Event()
    original, waker = watch.open_watch, wake.start
    if not use_watch:
        watch.open_watch = lambda paths: None  # type: ignore[assignment]
        wake.start = lambda agent: None  # type: ignore[assignment]
    thread = threading.Thread(target=agent.run, args=(stop,), daemon=True)
    thread.start()
    path = str(device_file(settings.device_path, 1))
    times = []
    try:
        deadline = time.monotonic() + 10
        while not (agent.reconciled_at and restored(path)):
            if time.monotonic() > deadline:
                raise RuntimeError("the agent did not start")
            time.sleep(0.01)
        for _ in range(rounds):
            time.sleep(random.uniform(0.0, 0.05))  # land anywhere in the poll period
            os.chmod(path, 0o666)  # noqa: S103 - what nvidia-modprobe does
            began = time.perf_counter()
            while not restored(path):
                if time.perf_counter() - began > 5:
                    raise RuntimeError("not restored within 5 s")
                time.sleep(0.0002)
            times.append(time.perf_counter() - began)
    finally:
        stop.set()
        thread.join(timeout=10)
        watch.open_watch, wake.start = original, waker
        ctx.close()
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    logging.getLogger("gpulocker").setLevel(logging.ERROR)
    results = {}
    for name, use_watch in (("watch", True), ("poll", False)):
        with tempfile.TemporaryDirectory(prefix="glbench-") as tmp:
            results[name] = chmod_loop(Path(tmp), args.rounds, use_watch)
    print(f"chmod 0666 -> back to 0660, {args.rounds} rounds each")
    for name, times in results.items():
        ms = [t * 1000 for t in times]
        print(
            f"  {name:<5}: p50 {pct(ms, 0.5):6.1f} ms  p99 {pct(ms, 0.99):6.1f} ms  "
            f"max {max(ms):6.1f} ms  over 50 ms: {sum(m > 50 for m in ms)}"
        )
    ratio = pct(results["poll"], 0.99) / pct(results["watch"], 0.99)
    print(f"  poll p99 / watch p99: {ratio:.1f}x")
    print(
        f"  target p99 < 50 ms with the watch: {'met' if pct(results['watch'], 0.99) < 0.05 else 'not met'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
