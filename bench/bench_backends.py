"""What one sample of 8 GPUs costs through the smi backend (two nvidia-smi processes) beside
the same through NVML, in one run.

No GPU is needed: the `h200x8` machine is replayed by the fake nvidia-smi (a shell script
that only echoes its capture, so its time is the cost of starting processes) and by the fake
pynvml (Python calls, so its time is the backend's own work plus /proc owner lookups, which
both sides do). The ratio is therefore what the subprocesses alone add; a real nvidia-smi
also pays for its own NVML start, so on a real host the gap is wider.

Run: .venv/bin/python bench/bench_backends.py [--samples N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import fake_pynvml  # noqa: E402
from tests.fake_pynvml import machines  # noqa: E402

from gpulocker.gpus.nvml import NvmlBackend  # noqa: E402
from gpulocker.gpus.smi import SmiBackend  # noqa: E402


def timed(sample: Callable[[], object], runs: int) -> list[float]:
    """Wall time of each of `runs` calls, in milliseconds (after one warm-up call)."""
    sample()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sample()
        times.append((time.perf_counter() - start) * 1000)
    return times


def describe(name: str, times: list[float]) -> str:
    return (
        f"{name:<28} median {statistics.median(times):8.3f} ms   "
        f"p90 {sorted(times)[int(len(times) * 0.9)]:8.3f} ms   ({len(times)} samples)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200)
    args = parser.parse_args()
    pids = {captured: os.getpid() for captured in machines.H200_PIDS}
    with tempfile.TemporaryDirectory() as tmp:
        capture = machines.stage_capture("h200x8", Path(tmp) / "h200x8", pids)
        os.environ["PATH"] = f"{machines.FAKE_SMI_BIN}{os.pathsep}{os.environ['PATH']}"
        os.environ["FAKE_NVIDIA_SMI_DIR"] = str(capture)
        sys.modules["pynvml"] = fake_pynvml.use(machines.h200x8(pids))
        nvml = NvmlBackend(Path("/dev"))
        smi = SmiBackend(Path("/dev"))
        assert len(nvml.inventory()) == len(smi.inventory()) == 8
        nvml_times = timed(nvml.sample, args.samples)
        smi_times = timed(smi.sample, args.samples)
        nvml.close()
    print("one sample of 8 GPUs (h200x8 machine; fake NVML vs fake nvidia-smi)")
    print(describe("nvml (fake pynvml)", nvml_times))
    print(describe("smi (2 nvidia-smi processes)", smi_times))
    ratio = statistics.median(smi_times) / statistics.median(nvml_times)
    print(f"ratio smi / nvml (medians): {ratio:.1f}x")


if __name__ == "__main__":
    main()
