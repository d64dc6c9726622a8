"""How long does the descriptor sweep take on a busy host?

5,000 sleeping processes each holding 10 open descriptors (50,000 in all, made here:
`/bin/sleep` started with 10 inherited files, one process also holding the simulated GPU
through a hard link). Timed per sample, in the same run:

- the agent's sweep (`procfs.DescriptorSweep` as `agent.holders.sweep_for` makes it for
  the default 2 s sampling): per sample, the new processes, the known holders and one
  slice of the rest; its detection bound is one round (slices x the sampling period);
- one full sweep (`procfs.holders_by_device`: every /proc/<pid>/fd, a stat() each), what
  every sample cost before and what a revoke still does;
- the baseline: a bare listing of the same /proc (list every /proc/<pid>/fd, no stat),
  the least any full sweep must do.

Target: under 50 ms a sample, with the detection bound stated. The bench also proves the
bound: a process already running (not new) opens the GPU after the sweep started, and
must be found within one round.

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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpulocker import procfs
from gpulocker.agent import holders
from gpulocker.config import Settings


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


CPU: dict[int, list[float]] = {}  # id(times) -> the CPU milliseconds of the same calls


def timed(call: object, samples: int) -> list[float]:
    """Wall milliseconds of each call (their CPU milliseconds in CPU[id(result)])."""
    times, cpu = [], []
    for _ in range(samples):
        began, began_cpu = time.perf_counter(), time.thread_time()
        call()  # type: ignore[operator]
        times.append((time.perf_counter() - began) * 1000)
        cpu.append((time.thread_time() - began_cpu) * 1000)
    CPU[id(times)] = cpu
    return times


def cpu_ms(times: list[float]) -> float:
    return statistics.median(CPU[id(times)])


def late_opener(path: Path) -> subprocess.Popen[bytes]:
    """A process that opens `path` only when told (a line on stdin), long after it started:
    the sweep cannot find it as a new process, only in its slice."""
    code = "import os, sys\nsys.stdin.readline()\nfd = os.open(sys.argv[1], os.O_RDONLY)\n"
    code += "print('open', flush=True)\nsys.stdin.readline()\n"
    return subprocess.Popen(
        [sys.executable, "-c", code, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )


def detection(sweep: procfs.DescriptorSweep, device: str, opener: subprocess.Popen[bytes]) -> int:
    """Samples until the sweep finds `opener` after it opened the GPU."""
    assert opener.stdin is not None and opener.stdout is not None
    opener.stdin.write(b"go\n")
    opener.stdin.flush()
    assert opener.stdout.readline() == b"open\n"
    for count in range(1, 10 * sweep.slices + 2):
        if opener.pid in {h.pid for h in sweep.sweep([device])[device]}:
            return count
    raise AssertionError("the sweep never found the late opener")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--processes", type=int, default=5000)
    parser.add_argument("--files", type=int, default=10)
    parser.add_argument("--samples", type=int, default=10)
    args = parser.parse_args()
    settings = Settings()
    period = settings.gpus_status_refresh_rate_seconds
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        device = base / "nvidia0"
        device.touch()
        os.link(device, base / "other-name")
        files = [os.open(base / f"f{i}", os.O_CREAT | os.O_RDONLY) for i in range(args.files)]
        held = os.open(base / "other-name", os.O_RDONLY)
        pids: list[int] = []
        opener = late_opener(device)
        began = time.monotonic()
        try:
            pids = spawn(args.processes, files, held)
            print(f"made {len(pids)} processes in {time.monotonic() - began:.1f} s")
            found = procfs.holders_by_device([str(device)])[str(device)]
            assert [h.pid for h in found] == [pids[0]], found  # through the other name
            descriptors = bare_listing()
            sweep = holders.sweep_for(settings)
            assert [h.pid for h in sweep.sweep([str(device)])[str(device)]] == [pids[0]]
            looked: list[int] = []

            def one_sample() -> None:
                assert [h.pid for h in sweep.sweep([str(device)])[str(device)]] == [pids[0]]
                looked.append(sweep.looked)

            rounds = max(args.samples, 2 * sweep.slices)
            incremental = timed(one_sample, rounds)
            full = timed(lambda: procfs.holders_by_device([str(device)]), args.samples)
            bare = timed(bare_listing, args.samples)
            found_after = detection(sweep, str(device), opener)
        finally:
            opener.kill()
            opener.wait()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            for pid in pids:
                os.waitpid(pid, 0)
    inc_ms, full_ms, bare_ms = (statistics.median(t) for t in (incremental, full, bare))
    bound = sweep.slices * period
    print(f"descriptors on the host: {descriptors}; load average {os.getloadavg()[0]:.1f}")
    print(
        f"agent sweep, per sample: median {inc_ms:.1f} ms, max {max(incremental):.1f} ms, "
        f"CPU {cpu_ms(incremental):.1f} ms ({statistics.median(looked):.0f} processes "
        f"looked at; {sweep.slices} slices a round)"
    )
    print(
        f"full sweep (before; revoke): median {full_ms:.1f} ms, max {max(full):.1f} ms, "
        f"CPU {cpu_ms(full):.1f} ms"
    )
    print(
        f"bare /proc listing (baseline): median {bare_ms:.1f} ms, max {max(bare):.1f} ms, "
        f"CPU {cpu_ms(bare):.1f} ms"
    )
    print(
        f"ratios: agent sweep / bare listing {inc_ms / bare_ms:.2f}x, "
        f"full sweep / bare listing {full_ms / bare_ms:.2f}x, "
        f"agent / full {inc_ms / full_ms:.2f}x"
    )
    print(f"target < 50 ms a sample: {'met' if inc_ms < 50 else 'not met'} (median)")
    print(
        f"detection bound: one round = {sweep.slices} samples x {period:g} s = {bound:g} s "
        f"(a new process: the next sample); the late opener was found after {found_after} "
        f"sample(s) ({'within' if found_after <= sweep.slices else 'BEYOND'} the bound)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
