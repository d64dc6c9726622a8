"""The smi backend on real nvidia-smi outputs other projects committed (../shared/real-smi).

Read in place and skipped when the folder is absent; see tests/gpus/real_smi.py for the
README's transformations from each real file to each of our invocations.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gpulocker import cudaline
from gpulocker.gpus.smi import APPS_FIELDS, SmiBackend
from tests.fake_pynvml import machines
from tests.gpus import real_smi

pytestmark = pytest.mark.skipif(not real_smi.available(), reason="../shared/real-smi is absent")
MASKED = "GPU-00000000-0000-0000-0000-000000000000"

# source -> [(index, minor, MiB, bus id, mig)], utilization/memory/power of GPU 0,
# and compute processes {index: {pid: MiB}}
EXPECTED: dict[
    str, tuple[list[tuple[int, int, int, str, bool]], tuple, dict[int, dict[int, float]]]
] = {
    "h100-mig_590.48.01_linux": (
        [(0, 0, 81559, "00000000:00:09.0", True)],
        (None, 11125.0, 433.78),  # MIG: utilization [N/A]
        {0: {21180: 2296.0, 21181: 1272.0, 21198: 7484.0}},
    ),
    "l40s_595.80_linux": (
        [(0, 0, 46068, "00000000:01:00.0", False)],
        (9.0, 1235.0, 110.23),
        {0: {20037: 538.0, 20038: 681.0}},
    ),
    "rtx-2080-super_610.57.04_linux": (
        [(0, 0, 8192, "00000000:0C:00.0", False)],
        (8.0, 815.0, 98.14),
        {0: {28512: 370.0, 28511: 230.0}},
    ),
    "pai_nvidia_smi_out_of_order.xml": (
        [
            (0, 1, 11441, "00001580:00:00.0", False),
            (1, 2, 11441, "00002DF7:00:00.0", False),
            (2, 3, 11441, "00004968:00:00.0", False),
            (3, 0, 11441, "0000F8D6:00:00.0", False),
        ],
        (99.0, 587.0, 135.72),
        {0: {58813: 576.0}, 1: {58642: 576.0}},
    ),
    "pai_nvidia_smi_sample_ecc_unsupported.xml": (
        [(0, 0, 10989, "00000000:02:00.0", False), (1, 1, 10989, "00000000:03:00.0", False)],
        (0.0, 0.0, 2.12),
        {},
    ),
    "telegraf_a100-sxm4-v12.xml": (
        [(0, 1, 81920, "00000000:01:00.0", True)],
        (None, 50.0, 67.03),
        {},
    ),
    "telegraf_rtx-3060-v12.xml": (
        [(0, 0, 12288, "00000000:2D:00.0", False)],
        (0.0, 116.0, 11.6),
        {},
    ),
    "telegraf_tesla-t4.xml": (  # Xorg (type G) is not a compute app
        [(0, 0, 15360, "00000000:00:1E.0", False)],
        (0.0, 1032.0, 26.78),
        {0: {5762: 1005.0}},
    ),
}
NO_MINOR = ["rtx-2080-super_610.62_windows", "telegraf_tesla_p4.xml"]  # WDDM, vGPU guest


def sources() -> list[Path]:
    return real_smi.captures() + real_smi.xmls() if real_smi.available() else []


def backend_for(source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SmiBackend:
    machines.use_fake_smi(monkeypatch, real_smi.stage(source, tmp_path / "smi"))
    return SmiBackend(tmp_path / "dev")


def test_every_real_source_is_checked() -> None:
    assert sorted(p.name for p in sources()) == sorted([*EXPECTED, *NO_MINOR])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_it_reads_every_gpu_minor_memory_uuid_and_process_of_a_real_capture(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = next(p for p in sources() if p.name == name)
    gpus_expected, reading, procs = EXPECTED[name]
    backend = backend_for(source, tmp_path, monkeypatch)
    gpus = backend.inventory()
    assert [
        (g.index, g.minor, g.memory_total_mib, g.pci_bus_id, g.mig) for g in gpus
    ] == gpus_expected
    assert [g.device for g in gpus] == [
        str(tmp_path / "dev" / f"nvidia{g[1]}") for g in gpus_expected
    ]
    assert backend.problems == []
    for gpu in gpus:  # real UUIDs (the exporter's are masked to zeros) make a valid CUDA line
        assert gpu.uuid is not None and cudaline.is_entry(gpu.uuid)
        if source.is_dir():
            assert gpu.uuid == MASKED
    assert len({g.uuid for g in gpus}) == (1 if source.is_dir() else len(gpus))
    samples = backend.sample()
    assert all(s.ok for s in samples) and len(samples) == len(gpus)
    first = samples[0]
    assert (first.utilization, first.memory_used_mib, first.power_w) == reading
    found = backend._processes(backend._query("query-compute-apps", APPS_FIELDS))
    assert {i: {pid: mib for pid, (mib, _) in p.items()} for i, p in found.items()} == procs


@pytest.mark.parametrize("name", NO_MINOR)
def test_a_gpu_without_a_minor_number_is_left_out_and_said_why(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = next(p for p in sources() if p.name == name)
    backend = backend_for(source, tmp_path, monkeypatch)
    assert backend.inventory() == []  # no /dev/nvidiaN to guard: never claimed as managed
    assert backend.problems == ["GPU 0: nvidia-smi -q gives no minor number; it is not managed"]


def test_windows_process_rows_with_na_memory_and_spaces_in_paths_are_read() -> None:
    source = next(p for p in real_smi.captures() if p.name.endswith("windows"))
    rows = real_smi.t1(source / "query-compute-apps.csv", APPS_FIELDS).splitlines()
    assert len(rows) == 21
    fields = [row.split(", ", 3) for row in rows]
    assert all(f[2] == "[N/A]" and f[1].isdigit() for f in fields)
    assert any(" " in f[3] for f in fields)
