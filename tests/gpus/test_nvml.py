"""The nvml backend against a fake `pynvml` (no GPU here), with real processes and owners."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from gpulocker.config import Settings
from gpulocker.gpus import NO_DRIVER, BackendUnavailable, GpuInfo, make_backend
from gpulocker.gpus.nvml import NvmlBackend, bus_id_text
from gpulocker.gpus.smi import SmiBackend
from gpulocker.inventory import assign_types, auto_type, types_from_config
from tests import fake_pynvml
from tests.fake_pynvml import FakeGpu, Machine, machines
from tests.helpers import TestUser


@pytest.fixture
def lab(monkeypatch: pytest.MonkeyPatch, lab_pids: dict[int, int]) -> Machine:
    """The fake pynvml installed, answering for the `lab` machine."""
    machine = machines.lab(lab_pids)
    fake_pynvml.install(monkeypatch, machine)
    return machine


@pytest.fixture
def backend(lab: Machine, tmp_path: Path) -> Iterator[NvmlBackend]:
    nvml = NvmlBackend(tmp_path / "dev")
    yield nvml
    nvml.close()


def test_it_maps_each_gpu_to_the_device_file_of_its_minor_number(
    backend: NvmlBackend, tmp_path: Path
) -> None:
    gpus = {g.index: g for g in backend.inventory()}
    assert (gpus[0].minor, gpus[1].minor) == (1, 0)
    assert gpus[0].device == str(tmp_path / "dev" / "nvidia1")
    assert gpus[1].device == str(tmp_path / "dev" / "nvidia0")
    assert gpus[0].name == "NVIDIA GeForce RTX 4090"
    assert gpus[0].uuid == "GPU-5a1c0e2e-6f3b-4c1d-9a3e-8b7f2d4c1e90"
    assert gpus[3].pci_bus_id == "00000000:C1:00.0"
    assert gpus[2].memory_total_mib == 81920
    assert backend.driver_version == "550.54.15"


def test_it_shows_a_gpu_in_mig_mode_as_one_whole_gpu(backend: NvmlBackend) -> None:
    gpus = backend.inventory()
    assert [g.mig for g in gpus] == [False, False, True, False]
    mig = backend.sample()[2]
    assert mig.ok and mig.utilization is None  # NVML reports no utilization in MIG mode
    assert mig.memory_used_mib == 18432
    assert [p.pid for p in mig.processes] == [os.getpid()]
    assert mig.processes[0].memory_mib == 0.0  # per-process memory is not reported either


def test_it_reads_every_field_of_a_healthy_gpu(
    backend: NvmlBackend, alice_process: subprocess.Popen[bytes], users: dict[str, TestUser]
) -> None:
    first = backend.sample()[0]
    assert first.ok and first.error is None
    assert (first.utilization, first.memory_used_mib, first.memory_total_mib) == (87, 10245, 24564)
    assert (first.temperature_c, first.power_w) == (64, 312.45)
    alice = next(u for name, u in users.items() if name.endswith("_alice"))
    [proc] = first.processes
    assert (proc.pid, proc.uid, proc.user) == (alice_process.pid, alice.uid, alice.name)
    assert (proc.memory_mib, proc.name) == (10240, "sleep")


def test_it_leaves_only_the_unsupported_field_empty(backend: NvmlBackend) -> None:
    second = backend.sample()[1]
    assert second.ok
    assert second.power_w is None
    assert (second.utilization, second.memory_used_mib, second.temperature_c) == (0, 251, 31)


def test_it_leaves_out_processes_that_have_ended(backend: NvmlBackend) -> None:
    assert backend.sample()[1].processes == []  # GONE_PID has no /proc entry


def test_it_fails_only_the_sample_of_a_lost_gpu(backend: NvmlBackend, lab: Machine) -> None:
    backend.inventory()
    machines.lose(lab, 3)
    samples = backend.sample()
    assert [s.ok for s in samples] == [True, True, True, False]
    lost = samples[3]
    assert lost.error == "GPU is lost"
    assert lost.utilization is None and lost.processes == []
    assert len(backend.inventory()) == 4  # still known: the agent marks it unhealthy


def test_it_fails_the_gpu_on_an_error_that_is_not_a_missing_field(
    backend: NvmlBackend, lab: Machine, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend.inventory()

    def broken(handle: object) -> int:
        if handle.gpu.index == 0:  # type: ignore[attr-defined]
            raise fake_pynvml.NVMLError(fake_pynvml.NVML_ERROR_UNKNOWN)
        return 1000

    monkeypatch.setattr(fake_pynvml, "nvmlDeviceGetPowerUsage", broken)
    samples = backend.sample()
    assert (samples[0].ok, samples[0].error) == (False, "Unknown Error")
    assert samples[1].ok and samples[2].power_w == 1.0


def test_it_leaves_out_a_gpu_lost_before_start_and_says_so(
    monkeypatch: pytest.MonkeyPatch, lab_pids: dict[int, int], tmp_path: Path
) -> None:
    fake_pynvml.install(monkeypatch, machines.lab(lab_pids, lost_before_start=True))
    backend = NvmlBackend(tmp_path)
    assert [g.index for g in backend.inventory()] == [0, 1, 2]
    assert backend.problems == ["GPU 3: GPU is lost; it is not managed"]
    assert len(backend.sample()) == 3


def test_it_initialises_once_and_reads_each_gpu_once_per_sample(
    backend: NvmlBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend.inventory()

    def no_subprocess(*args: object, **kwargs: object) -> None:
        raise AssertionError("the nvml backend must not start a process")

    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    fake_pynvml.calls.clear()
    for _ in range(3):
        backend.sample()
    calls = fake_pynvml.calls
    assert calls["nvmlInit"] == 0 and calls["nvmlDeviceGetHandleByIndex"] == 0
    for query in (
        "nvmlDeviceGetUtilizationRates",
        "nvmlDeviceGetMemoryInfo",
        "nvmlDeviceGetTemperature",
        "nvmlDeviceGetPowerUsage",
        "nvmlDeviceGetComputeRunningProcesses",
        "nvmlDeviceGetGraphicsRunningProcesses",
    ):
        assert calls[query] == 3 * 4, query


def test_it_counts_a_process_that_is_both_compute_and_graphics_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    gpu = FakeGpu(
        0,
        "NVIDIA RTX A6000",
        "GPU-1",
        "0000:65:00.0",
        0,
        49140,
        processes=[(os.getpid(), 300)],
        graphics=[(os.getpid(), 300), (1, 12)],
    )
    fake_pynvml.install(monkeypatch, Machine(gpus=[gpu]))
    backend = NvmlBackend(tmp_path)
    [sample] = backend.sample()
    assert [(p.pid, p.memory_mib) for p in sample.processes] == [(1, 12), (os.getpid(), 300)]
    assert backend.inventory()[0].pci_bus_id == "00000000:65:00.0"


def test_it_shuts_nvml_down_once(backend: NvmlBackend) -> None:
    backend.close()
    backend.close()
    assert fake_pynvml.calls["nvmlShutdown"] == 1
    assert fake_pynvml.initialized == 0


def test_it_refuses_to_start_without_the_driver(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake_pynvml.install(
        monkeypatch, Machine(gpus=[], missing=fake_pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    )
    with pytest.raises(BackendUnavailable, match="NVML Shared Library Not Found"):
        NvmlBackend(tmp_path)


def _settings(tmp_path: Path, backend: str = "nvml") -> Settings:
    return Settings(state_dir=tmp_path, gpu_backend=backend, device_dir=tmp_path / "dev")


def test_it_says_one_clear_line_when_there_is_no_driver_at_all(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake_pynvml.install(
        monkeypatch, Machine(gpus=[], missing=fake_pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
    )
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi either
    for backend in ("nvml", "smi"):
        with pytest.raises(BackendUnavailable) as caught:
            make_backend(_settings(tmp_path, backend))
        assert str(caught.value) == NO_DRIVER
    assert NO_DRIVER == "no NVIDIA driver found; run with --simulate to try GPULocker without GPUs"


def test_it_falls_back_to_nvidia_smi_when_nvml_cannot_load(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, lab_pids: dict[int, int]
) -> None:
    fake_pynvml.install(
        monkeypatch, Machine(gpus=[], missing=fake_pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    )
    machines.use_fake_smi(monkeypatch, machines.stage_capture("lab", tmp_path / "lab", lab_pids))
    backend = make_backend(_settings(tmp_path))
    assert isinstance(backend, SmiBackend)
    assert backend.fallback_reason == "NVML cannot start: NVML Shared Library Not Found"
    assert len(backend.inventory()) == 4


def test_it_uses_nvml_when_it_loads(backend: NvmlBackend, tmp_path: Path) -> None:
    made = make_backend(_settings(tmp_path))
    assert made.name == "nvml"
    made.close()


def test_it_groups_detected_gpus_into_types_by_model(backend: NvmlBackend) -> None:
    typed = assign_types({}, backend.inventory())
    assert [(t.info.index, t.gpu_type) for t in typed] == [
        (0, "4090"),
        (1, "4090"),
        (2, "a100"),
        (3, "a100"),
    ]


def test_it_stops_on_a_configured_gpu_that_does_not_exist(backend: NvmlBackend) -> None:
    with pytest.raises(ValueError, match=r"GPU id\(s\) \[7\] of type 'h100' do not exist"):
        types_from_config({"4090": [0, 1], "h100": [7]}, backend.inventory())


@pytest.mark.parametrize(
    ("name", "short"),
    [
        ("NVIDIA GeForce RTX 4090", "4090"),
        ("NVIDIA GeForce RTX 3090 Ti", "3090ti"),
        ("NVIDIA GeForce RTX 4080 SUPER", "4080super"),
        ("NVIDIA A100-SXM4-80GB", "a100"),
        ("NVIDIA A100 80GB PCIe", "a100"),
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA GH200 480GB", "gh200"),
        ("Tesla V100-PCIE-16GB", "v100"),
        ("Tesla T4", "t4"),
        ("NVIDIA RTX A6000", "a6000"),
        ("NVIDIA RTX 6000 Ada Generation", "6000ada"),
        ("Quadro RTX 8000", "8000"),
        ("NVIDIA TITAN RTX", "titan"),
        ("NVIDIA L40S", "l40s"),
        ("NVIDIA", "gpu"),
    ],
)
def test_it_names_types_short_and_readable(name: str, short: str) -> None:
    assert auto_type(name) == short


def _info(index: int, name: str, memory_mib: int) -> GpuInfo:
    return GpuInfo(index, name, index, f"/dev/nvidia{index}", memory_mib)


def test_it_never_mixes_two_models_in_one_auto_detected_type() -> None:
    gpus = [
        _info(0, "NVIDIA A100-SXM4-40GB", 40960),
        _info(1, "NVIDIA A100-SXM4-80GB", 81920),
        _info(2, "NVIDIA A100 80GB PCIe", 81920),
        _info(3, "NVIDIA GeForce RTX 4090", 24564),
    ]
    assert [t.gpu_type for t in assign_types({}, gpus)] == [
        "a100-40gb",
        "nvidia-a100-sxm4-80gb",
        "nvidia-a100-80gb-pcie",
        "4090",
    ]
    assert [t.gpu_type for t in assign_types({}, gpus[:2])] == ["a100-40gb", "a100-80gb"]


def test_it_writes_bus_ids_as_nvidia_smi_does() -> None:
    assert bus_id_text(b"0000:01:00.0") == "00000000:01:00.0"
    assert bus_id_text("00000000:c1:00.0") == "00000000:C1:00.0"


def test_the_fake_library_behaves_like_the_real_one(lab: Machine) -> None:
    import pynvml

    assert isinstance(pynvml, ModuleType) and pynvml is fake_pynvml
    error = pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
    assert isinstance(error, pynvml.NVMLError_GpuIsLost) and str(error) == "GPU is lost"
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        pynvml.nvmlDeviceGetCount()


def test_no_permission_on_one_gpu_of_four_leaves_the_other_three_working(
    monkeypatch: pytest.MonkeyPatch, lab_pids: dict[int, int], tmp_path: Path
) -> None:
    machine = machines.lab(lab_pids)
    machine.gpus[1].handle_error = fake_pynvml.NVML_ERROR_NO_PERMISSION  # counted, not opened
    machine.gpus[0].power_mw = None  # NOT_SUPPORTED on one field of another GPU
    fake_pynvml.install(monkeypatch, machine)
    backend = NvmlBackend(tmp_path)
    gpus = backend.inventory()
    assert [g.index for g in gpus] == [0, 2, 3]
    assert all(g.uuid and g.uuid.startswith("GPU-") for g in gpus)
    assert backend.problems == ["GPU 1: Insufficient Permissions; it is not managed"]
    machines.lose(machine, 3)  # and one is lost while running
    samples = {s.index: s for s in backend.sample()}
    assert sorted(samples) == [0, 2, 3]
    assert samples[0].ok and samples[0].power_w is None and samples[0].utilization is not None
    assert samples[2].ok and samples[2].memory_used_mib is not None
    assert not samples[3].ok and samples[3].error == "GPU is lost"
    backend.close()


def test_the_cuda_line_of_an_nvml_gpu_is_its_uuid(backend: NvmlBackend) -> None:
    from gpulocker import cudaline

    gpus = backend.inventory()
    line = cudaline.value((g.index, g.uuid) for g in gpus if g.index in (1, 3))
    assert line == f"{gpus[1].uuid},{gpus[3].uuid}"
    assert cudaline.export_line(line).startswith("export CUDA_DEVICE_ORDER=PCI_BUS_ID ")
