"""The smi backend against a fake nvidia-smi replaying captured outputs; it must read the
same GPUs and the same samples as the nvml backend does from the same machine."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from gpulocker.config import Settings
from gpulocker.gpus import NO_DRIVER, BackendUnavailable, GpuSample, make_backend
from gpulocker.gpus.nvml import NvmlBackend
from gpulocker.gpus.smi import GpuFailed, SmiBackend, parse_minors, value
from tests import fake_pynvml
from tests.fake_pynvml import machines


@pytest.fixture
def smi_log(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Where the fake nvidia-smi writes one line per call."""
    path = tmp_path / "smi.log"
    monkeypatch.setenv("FAKE_NVIDIA_SMI_LOG", str(path))
    return path


def stage(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str, pids: dict[int, int]) -> Path:
    """Captures of machine `name` replayed by the fake nvidia-smi first on PATH."""
    dest = machines.stage_capture(name, tmp_path / name, pids)
    machines.use_fake_smi(monkeypatch, dest)
    return dest


def comparable(samples: list[GpuSample]) -> list[dict[str, Any]]:
    """Samples without their timestamps (the two backends read at different instants)."""
    return [{k: v for k, v in s.to_dict().items() if k != "at"} for s in samples]


def test_both_backends_read_the_same_lab_machine(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, lab_pids: dict[int, int]
) -> None:
    stage(monkeypatch, tmp_path, "lab", lab_pids)
    machine = fake_pynvml.install(monkeypatch, machines.lab(lab_pids)).machine
    nvml, smi = NvmlBackend(tmp_path / "dev"), SmiBackend(tmp_path / "dev")
    assert smi.inventory() == nvml.inventory()
    assert smi.driver_version == nvml.driver_version == "550.54.15"
    machines.lose(machine, 3)  # the capture shows GPU 3 as "[GPU is lost]"
    smi_samples, nvml_samples = comparable(smi.sample()), comparable(nvml.sample())
    assert smi_samples == nvml_samples
    assert [s["ok"] for s in smi_samples] == [True, True, True, False]
    assert smi_samples[3]["error"] == "GPU is lost"
    assert smi_samples[1]["power_w"] is None  # "[Not Supported]"
    assert smi_samples[2]["utilization"] is None  # "[N/A]" in MIG mode
    assert [p["pid"] for p in smi_samples[0]["processes"]] == [lab_pids[48213]]


def test_both_backends_read_the_same_eight_h200(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pids = {captured: os.getpid() for captured in machines.H200_PIDS}
    stage(monkeypatch, tmp_path, "h200x8", pids)
    fake_pynvml.install(monkeypatch, machines.h200x8(pids))
    nvml, smi = NvmlBackend(tmp_path / "dev"), SmiBackend(tmp_path / "dev")
    inventory = smi.inventory()
    assert inventory == nvml.inventory()
    assert [g.minor for g in inventory] == [2, 3, 0, 1, 6, 7, 4, 5]
    assert inventory[0].device == str(tmp_path / "dev" / "nvidia2")
    assert comparable(smi.sample()) == comparable(nvml.sample())


def test_both_leave_out_a_gpu_lost_before_start(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, lab_pids: dict[int, int]
) -> None:
    stage(monkeypatch, tmp_path, "lab-lost", lab_pids)
    fake_pynvml.install(monkeypatch, machines.lab(lab_pids, lost_before_start=True))
    nvml, smi = NvmlBackend(tmp_path / "dev"), SmiBackend(tmp_path / "dev")
    assert [g.index for g in smi.inventory()] == [0, 1, 2]
    assert smi.inventory() == nvml.inventory()
    assert smi.problems == [
        "GPU 00000000:C1:00.0: GPU is lost. Reboot the system to recover this GPU; "
        "it is not managed"
    ]
    assert comparable(smi.sample()) == comparable(nvml.sample())


def test_a_gpu_that_disappears_from_the_output_fails_its_sample(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, lab_pids: dict[int, int]
) -> None:
    stage(monkeypatch, tmp_path, "lab", lab_pids)
    smi = SmiBackend(tmp_path / "dev")
    lost = stage(monkeypatch, tmp_path, "lab-lost", lab_pids)
    monkeypatch.setenv("FAKE_NVIDIA_SMI_DIR", str(lost))
    samples = smi.sample()
    assert [s.ok for s in samples] == [True, True, True, False]
    assert samples[3].error is not None and samples[3].error.startswith("GPU is lost")


def test_it_reads_the_inventory_once_and_samples_with_two_calls(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, lab_pids: dict[int, int], smi_log: Path
) -> None:
    stage(monkeypatch, tmp_path, "lab", lab_pids)
    smi = SmiBackend(tmp_path / "dev")
    smi.inventory()
    smi.sample()
    smi.sample()
    calls = smi_log.read_text().splitlines()
    assert calls.count("-q") == 1
    assert len(calls) == 2 + 2 * 2
    assert all("--format=csv,noheader,nounits" in c for c in calls if c != "-q")


def test_every_gpu_fails_but_nothing_raises_when_nvidia_smi_stops_working(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, lab_pids: dict[int, int]
) -> None:
    stage(monkeypatch, tmp_path, "lab", lab_pids)
    smi = SmiBackend(tmp_path / "dev")
    broken = stage(monkeypatch, tmp_path, "no-driver", lab_pids)
    monkeypatch.setenv("FAKE_NVIDIA_SMI_DIR", str(broken))
    samples = smi.sample()
    assert [s.ok for s in samples] == [False] * 4
    assert samples[0].error is not None and "no capture" in samples[0].error


def test_it_refuses_to_start_when_nvidia_smi_cannot_reach_the_driver(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    stage(monkeypatch, tmp_path, "no-driver", {})
    with pytest.raises(BackendUnavailable, match="couldn't communicate with the NVIDIA driver"):
        SmiBackend(tmp_path / "dev")
    settings = Settings(state_dir=tmp_path, gpu_backend="smi", device_dir=tmp_path / "dev")
    with pytest.raises(BackendUnavailable) as caught:
        make_backend(settings)
    assert str(caught.value) == NO_DRIVER


def test_it_takes_the_minor_number_of_each_gpu_from_nvidia_smi_q() -> None:
    text = (machines.FIXTURES / "lab" / "q.out").read_text()
    assert parse_minors(text) == {
        "00000000:01:00.0": 1,
        "00000000:21:00.0": 0,
        "00000000:41:00.0": 2,
        "00000000:C1:00.0": 3,
    }


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("87", "87"),
        (" [N/A]", None),
        ("[Not Supported]", None),
        ("N/A", None),
        ("[Insufficient Permissions]", None),
    ],
)
def test_it_reads_a_missing_field_as_none(raw: str, expected: str | None) -> None:
    assert value(raw) == expected


@pytest.mark.parametrize("raw", ["[GPU is lost]", "[Unknown Error]", "[GPU requires reset]"])
def test_it_reads_a_failed_gpu_as_a_failure(raw: str) -> None:
    with pytest.raises(GpuFailed, match=raw[1:-1]):
        value(raw)
