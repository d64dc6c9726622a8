"""The test machines, described twice: for the fake NVML (here) and as captured nvidia-smi
outputs (tests/fixtures/smi/<name>/). Both backends must read the same GPUs from them.

Captured outputs carry the pids of the machine they came from; a test maps them to pids
that exist here (`pids`), so owners are read from the real /proc.

- `lab`: two RTX 4090 whose minor numbers are swapped (index 0 is /dev/nvidia1), an A100 in
  MIG mode (no utilization, no per-process memory), an A100 lost after start, a 4090 that
  cannot report power, and a process whose path holds a comma.
- `lab-lost`: the same host with the second A100 lost before start (no handle at all).
- `h200x8`: eight H200 with minor numbers that are not their indices (the benchmark).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import pytest

from tests.fake_pynvml import FakeGpu, Machine

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "smi"
FAKE_SMI_BIN = FIXTURES / "bin"
APPS_PREFIX = "query-compute-apps="

# The pids in the captures, by role.
LAB_PIDS = {"alice": 48213, "gone": 51120, "mig": 48377}
H200_PIDS = (73001, 73002, 73004, 73003)


def _pid(pids: Mapping[int, int], captured: int) -> int:
    return pids.get(captured, captured)


def lab(pids: Mapping[int, int] | None = None, lost_before_start: bool = False) -> Machine:
    """The `lab` host as the fake NVML sees it."""
    p = pids or {}
    gpus = [
        FakeGpu(
            index=0,
            name="NVIDIA GeForce RTX 4090",
            uuid="GPU-5a1c0e2e-6f3b-4c1d-9a3e-8b7f2d4c1e90",
            bus_id="00000000:01:00.0",
            minor=1,
            memory_total_mib=24564,
            memory_used_mib=10245,
            utilization=87,
            temperature_c=64,
            power_mw=312_450,
            processes=[(_pid(p, LAB_PIDS["alice"]), 10240)],
        ),
        FakeGpu(
            index=1,
            name="NVIDIA GeForce RTX 4090",
            uuid="GPU-0b7d93f1-2c4e-4a8b-b1d2-7e6f5a4c3b21",
            bus_id="00000000:21:00.0",
            minor=0,
            memory_total_mib=24564,
            memory_used_mib=251,
            utilization=0,
            temperature_c=31,
            power_mw=None,
            processes=[(_pid(p, LAB_PIDS["gone"]), 250)],
        ),
        FakeGpu(
            index=2,
            name="NVIDIA A100-SXM4-80GB",
            uuid="GPU-c3e8a7d2-91b4-4f6e-8d0a-2b5c7e9f1a34",
            bus_id="00000000:41:00.0",
            minor=2,
            memory_total_mib=81920,
            memory_used_mib=18432,
            utilization=None,
            temperature_c=38,
            power_mw=91_070,
            mig=True,
            processes=[(_pid(p, LAB_PIDS["mig"]), None)],
        ),
        FakeGpu(
            index=3,
            name="NVIDIA A100-SXM4-80GB",
            uuid="GPU-7f2a6c1b-d8e3-4b5f-a9c2-e4d1b7a3f856",
            bus_id="00000000:C1:00.0",
            minor=3,
            memory_total_mib=81920,
            mig=False,
            lost_handle=lost_before_start,
        ),
    ]
    return Machine(gpus=gpus, driver_version="550.54.15")


def lose(machine: Machine, index: int) -> None:
    """Make GPU `index` fall off the bus (every query on it fails from now on)."""
    next(g for g in machine.gpus if g.index == index).lost = True


def h200x8(pids: Mapping[int, int] | None = None) -> Machine:
    """The `h200x8` host as the fake NVML sees it."""
    p = pids or {}
    bus = ["18", "2A", "3A", "5D", "9A", "AB", "BA", "DB"]
    minors = [2, 3, 0, 1, 6, 7, 4, 5]
    util = [97, 100, 0, 0, 64, 0, 88, 0]
    used = [71234, 139870, 0, 0, 40960, 0, 81203, 0]
    temp = [61, 67, 29, 30, 55, 31, 58, 28]
    power = [512_380, 689_910, 74_120, 75_400, 433_050, 73_870, 498_660, 74_900]
    uuids = [
        "6513270e-269e-0d37-f2a7-4de452e6b438",
        "d23f0824-128b-2f33-0c5c-7fd0a6a3a450",
        "9531985d-5d9d-c9f8-1818-e811892f902b",
        "36f675cc-81e7-4ef5-e8e2-5d940ed90475",
        "6b0d549b-6f03-675a-1600-a35a099950d8",
        "8d116ece-1738-f7d9-3d9c-172411e20b8f",
        "90c192cf-d3ac-94af-0f21-ddb66cad4a26",
        "a170b338-3926-3059-f28c-105d1fb17c23",
    ]
    procs = {0: (73001, 71232), 1: (73002, 139868), 4: (73003, 40958), 6: (73004, 81201)}
    gpus = []
    for i, b in enumerate(bus):
        gpu = FakeGpu(
            index=i,
            name="NVIDIA H200",
            uuid=f"GPU-{uuids[i]}",
            bus_id=f"00000000:{b}:00.0",
            minor=minors[i],
            memory_total_mib=143771,
            memory_used_mib=used[i],
            utilization=util[i],
            temperature_c=temp[i],
            power_mw=power[i],
            mig=False,
        )
        if i in procs:
            gpu.processes = [(_pid(p, procs[i][0]), procs[i][1])]
        gpus.append(gpu)
    return Machine(gpus=gpus, driver_version="560.35.03")


def stage_capture(name: str, dest: Path, pids: Mapping[int, int] | None = None) -> Path:
    """Copy the captured outputs of machine `name` to `dest`, mapping captured pids to `pids`."""
    shutil.copytree(FIXTURES / name, dest)
    for apps in dest.glob(f"{APPS_PREFIX}*.out"):
        lines = []
        for line in apps.read_text().splitlines():
            fields = line.split(", ", 3)
            if len(fields) > 1 and fields[1].isdigit():
                fields[1] = str(_pid(pids or {}, int(fields[1])))
            lines.append(", ".join(fields))
        apps.write_text("".join(f"{line}\n" for line in lines))
    return dest


def use_fake_smi(monkeypatch: pytest.MonkeyPatch, capture_dir: Path) -> None:
    """Put the fake nvidia-smi first on PATH, replaying `capture_dir`."""
    monkeypatch.setenv("PATH", f"{FAKE_SMI_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("FAKE_NVIDIA_SMI_DIR", str(capture_dir))
