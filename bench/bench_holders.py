"""How long does the descriptor sweep take on a busy host?

5,000 sleeping processes each holding 10 open descriptors (50,000 in all, made here:
`/bin/sleep` started with 10 inherited files, one process also holding the simulated GPU
through a hard link). Timed per sample: `procfs.holders_by_device` (list every
/proc/<pid>/fd and stat() each descriptor) beside, in the same run, a bare listing of the
same /proc (list every /proc/<pid>/fd, no stat): the least any sweep must do. Target: under
50 ms a sample; otherwise the detection bound is the sampling period plus one sweep.

Needs no root. Mind `ulimit -u` (5,000 processes) and the machine: they sleep, cost only
memory, and are killed at the end whatever happens.

    .venv/bin/python bench/bench_holders.py [--processes 5000] [--files 10] [--samples 10]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from gpulocker import procfs


def bare_listing() -> int:
    """List /proc and every /proc/<pid>/fd; the count of descriptors seen."""
    seen = 0
    with os.scandir("/proc") as entries:
        pids = [e.name for e in entries if e.name.isdigit()]
    for pid in pids:
        try:
            seen += len(os.listdir(f"/proc/{pid}/fd/"))
        except OSError:
            continue
    return seen


def spawn(count: int, files: list[int], extra: int | None = None) -> list[int]:
    """`count` sleeping processes holding `files` (and `extra` for the first one)."""
    pids = []
    devnull = os.open(os.devnull, os.O_RDWR)
    actions = [(os.POSIX_SPAWN_DUP2, devnull, n) for n in (0, 1, 2)]
    for fd in files:
        os.set_inheritable(fd, True)
    for i in range(count):
        if i == 0 and extra is not None:
            os.set_inheritable(extra, True)
        pids.append(os.posix_spawn("/bin/sleep", ["sleep", "3600"], {}, file_actions=actions))
        if i == 0 and extra is not None:
            os.set_inheritable(extra, False)
    os.close(devnull)
    return pids


def timed(call: object, samples: int) -> list[float]:
    times = []
    for _ in range(samples):
        began = time.perf_counter()
        call()  # type: ignore[operator]
        times.append((time.perf_counter() - began) * 1000)
    return times


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--processes", type=int, default=5000)
    parser.add_argument("--files", type=int, default=10)
    parser.add_argument("--samples", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        device = base / "nvidia0"
        device.touch()
        os.link(device, base / "other-name")
        files = [os.open(base / f"f{i}", os.O_CREAT | os.O_RDONLY) for i in range(args.files)]
        held = os.open(base / "other-name", os.O_RDONLY)
        pids: list[int] = []
        began = time.monotonic()
        try:
            pids = spawn(args.processes, files, held)
            print(f"made {len(pids)} processes in {time.monotonic() - began:.1f} s")
            found = procfs.holders_by_device([str(device)])[str(device)]
            assert [h.pid for h in found] == [pids[0]], found  # through the other name
            descriptors = bare_listing()
            sweep = timed(lambda: procfs.holders_by_device([str(device)]), args.samples)
            bare = timed(bare_listing, args.samples)
        finally:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            for pid in pids:
                os.waitpid(pid, 0)
    sweep_ms, bare_ms = statistics.median(sweep), statistics.median(bare)
    print(f"descriptors on the host: {descriptors}")
    print(f"descriptor sweep: median {sweep_ms:.1f} ms, max {max(sweep):.1f} ms per sample")
    print(f"bare /proc listing (baseline): median {bare_ms:.1f} ms, max {max(bare):.1f} ms")
    print(f"ratio sweep / bare listing: {sweep_ms / bare_ms:.2f}x")
    print(f"target < 50 ms: {'met' if sweep_ms < 50 else 'not met'}")
    print(
        "detection bound: sampling period (GPUS_STATUS_REFRESH_RATE_SECONDS) "
        f"+ {max(sweep):.0f} ms for one sweep"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
