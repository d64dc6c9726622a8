"""A stand-in for the `pynvml` module (nvidia-ml-py) that answers from a described machine.

The real library needs a driver and a GPU; this one is put in `sys.modules["pynvml"]` by
`install()`, so `import pynvml` inside the backend gets it. It copies the parts of the real
module the backend relies on: error codes, the NVMLError class whose constructor returns
the subclass for a code (`NVMLError(15)` is an `NVMLError_GpuIsLost`), bytes where the real
one returns bytes (PCI bus id, driver version), bytes for memory and milliwatts for power.

A field set to None in a `FakeGpu` raises NotSupported, as NVML does for a field a GPU
cannot report; `lost=True` makes every query on that GPU raise GpuIsLost (a GPU that fell
off the bus after start), `lost_handle=True` makes even its handle unobtainable (lost
before start).
"""

from __future__ import annotations

import sys
import types
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_UNKNOWN = 999
NVML_TEMPERATURE_GPU = 0
NVML_DEVICE_MIG_DISABLE = 0
NVML_DEVICE_MIG_ENABLE = 1

MIB = 1024 * 1024

_STRINGS = {
    NVML_ERROR_UNINITIALIZED: "Uninitialized",
    NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
    NVML_ERROR_NOT_SUPPORTED: "Not Supported",
    NVML_ERROR_NO_PERMISSION: "Insufficient Permissions",
    NVML_ERROR_NOT_FOUND: "Not Found",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
    NVML_ERROR_FUNCTION_NOT_FOUND: "Function Not Found",
    NVML_ERROR_GPU_IS_LOST: "GPU is lost",
    NVML_ERROR_UNKNOWN: "Unknown Error",
}


class NVMLError(Exception):
    """Like pynvml's: constructing it with a code gives the subclass for that code."""

    _classes: dict[int, type[NVMLError]] = {}
    value: int

    def __new__(cls, value: int) -> NVMLError:
        if cls is NVMLError:
            cls = NVMLError._classes.get(value, cls)
        obj = Exception.__new__(cls)
        obj.value = value
        return obj

    def __init__(self, value: int) -> None:
        super().__init__(value)

    def __str__(self) -> str:
        return _STRINGS.get(self.value, f"NVML Error with code {self.value}")


def _error_class(code: int, name: str) -> type[NVMLError]:
    cls = type(name, (NVMLError,), {})
    NVMLError._classes[code] = cls
    return cls


NVMLError_Uninitialized = _error_class(NVML_ERROR_UNINITIALIZED, "NVMLError_Uninitialized")
NVMLError_NotSupported = _error_class(NVML_ERROR_NOT_SUPPORTED, "NVMLError_NotSupported")
NVMLError_NoPermission = _error_class(NVML_ERROR_NO_PERMISSION, "NVMLError_NoPermission")
NVMLError_DriverNotLoaded = _error_class(NVML_ERROR_DRIVER_NOT_LOADED, "NVMLError_DriverNotLoaded")
NVMLError_LibraryNotFound = _error_class(NVML_ERROR_LIBRARY_NOT_FOUND, "NVMLError_LibraryNotFound")
NVMLError_GpuIsLost = _error_class(NVML_ERROR_GPU_IS_LOST, "NVMLError_GpuIsLost")
NVMLError_Unknown = _error_class(NVML_ERROR_UNKNOWN, "NVMLError_Unknown")


@dataclass
class FakeGpu:
    """One GPU of the fake machine. None in a reading = NotSupported for that field."""

    index: int
    name: str
    uuid: str
    bus_id: str
    minor: int
    memory_total_mib: int
    memory_used_mib: int = 0
    utilization: int | None = 0
    temperature_c: int | None = 30
    power_mw: int | None = 50_000
    mig: bool | None = None  # None: the GPU has no MIG (NotSupported)
    processes: list[tuple[int, int | None]] = field(default_factory=list)  # (pid, MiB)
    graphics: list[tuple[int, int | None]] = field(default_factory=list)
    mps: list[tuple[int, int | None]] = field(default_factory=list)
    lost: bool = False
    lost_handle: bool = False
    handle_error: int | None = None  # e.g. NVML_ERROR_NO_PERMISSION from GetHandleByIndex


@dataclass
class Machine:
    """What the fake library answers; `missing` makes nvmlInit fail as with no driver."""

    gpus: list[FakeGpu]
    driver_version: str = "550.54.15"
    missing: int | None = None  # e.g. NVML_ERROR_LIBRARY_NOT_FOUND


@dataclass
class _Memory:
    total: int
    used: int
    free: int


@dataclass
class _Utilization:
    gpu: int
    memory: int


@dataclass
class _PciInfo:
    busId: bytes
    busIdLegacy: bytes


@dataclass
class _Process:
    pid: int
    usedGpuMemory: int | None


@dataclass
class _Handle:
    gpu: FakeGpu


machine: Machine = Machine(gpus=[])
calls: Counter[str] = Counter()
initialized = 0


def _count(name: str) -> None:
    calls[name] += 1
    if name != "nvmlInit" and initialized <= 0:
        raise NVMLError(NVML_ERROR_UNINITIALIZED)


def _gpu(handle: _Handle) -> FakeGpu:
    if handle.gpu.lost:
        raise NVMLError(NVML_ERROR_GPU_IS_LOST)
    return handle.gpu


def _reading(value: Any) -> Any:
    if value is None:
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
    return value


def nvmlInit() -> None:
    """Fails like the real one when the machine has no driver."""
    global initialized
    _count("nvmlInit")
    if machine.missing is not None:
        raise NVMLError(machine.missing)
    initialized += 1


def nvmlShutdown() -> None:
    global initialized
    _count("nvmlShutdown")
    initialized -= 1


def nvmlSystemGetDriverVersion() -> bytes:
    _count("nvmlSystemGetDriverVersion")
    return machine.driver_version.encode()


def nvmlDeviceGetCount() -> int:
    _count("nvmlDeviceGetCount")
    return len(machine.gpus)


def nvmlDeviceGetHandleByIndex(index: int) -> _Handle:
    _count("nvmlDeviceGetHandleByIndex")
    gpu = next((g for g in machine.gpus if g.index == index), None)
    if gpu is None:
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    if gpu.lost_handle:
        raise NVMLError(NVML_ERROR_GPU_IS_LOST)
    if gpu.handle_error is not None:
        raise NVMLError(gpu.handle_error)
    return _Handle(gpu)


def nvmlDeviceGetName(handle: _Handle) -> str:
    _count("nvmlDeviceGetName")
    return _gpu(handle).name


def nvmlDeviceGetUUID(handle: _Handle) -> str:
    _count("nvmlDeviceGetUUID")
    return _gpu(handle).uuid


def nvmlDeviceGetPciInfo(handle: _Handle) -> _PciInfo:
    _count("nvmlDeviceGetPciInfo")
    bus_id = _gpu(handle).bus_id
    return _PciInfo(busId=bus_id.encode(), busIdLegacy=bus_id[4:].encode())


def nvmlDeviceGetMinorNumber(handle: _Handle) -> int:
    _count("nvmlDeviceGetMinorNumber")
    return _gpu(handle).minor


def nvmlDeviceGetMigMode(handle: _Handle) -> list[int]:
    _count("nvmlDeviceGetMigMode")
    mode = int(_reading(_gpu(handle).mig))
    return [mode, mode]


def nvmlDeviceGetMemoryInfo(handle: _Handle) -> _Memory:
    _count("nvmlDeviceGetMemoryInfo")
    gpu = _gpu(handle)
    total, used = gpu.memory_total_mib * MIB, gpu.memory_used_mib * MIB
    return _Memory(total=total, used=used, free=total - used)


def nvmlDeviceGetUtilizationRates(handle: _Handle) -> _Utilization:
    _count("nvmlDeviceGetUtilizationRates")
    return _Utilization(gpu=_reading(_gpu(handle).utilization), memory=0)


def nvmlDeviceGetTemperature(handle: _Handle, sensor: int) -> int:
    _count("nvmlDeviceGetTemperature")
    if sensor != NVML_TEMPERATURE_GPU:
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    return int(_reading(_gpu(handle).temperature_c))


def nvmlDeviceGetPowerUsage(handle: _Handle) -> int:
    _count("nvmlDeviceGetPowerUsage")
    return int(_reading(_gpu(handle).power_mw))


def _processes(entries: list[tuple[int, int | None]]) -> list[_Process]:
    return [_Process(pid, None if mib is None else mib * MIB) for pid, mib in entries]


def nvmlDeviceGetComputeRunningProcesses(handle: _Handle) -> list[_Process]:
    _count("nvmlDeviceGetComputeRunningProcesses")
    return _processes(_gpu(handle).processes)


def nvmlDeviceGetGraphicsRunningProcesses(handle: _Handle) -> list[_Process]:
    _count("nvmlDeviceGetGraphicsRunningProcesses")
    return _processes(_gpu(handle).graphics)


def nvmlDeviceGetMPSComputeRunningProcesses(handle: _Handle) -> list[_Process]:
    _count("nvmlDeviceGetMPSComputeRunningProcesses")
    return _processes(_gpu(handle).mps)


def use(new_machine: Machine) -> types.ModuleType:
    """Make the fake answer for `new_machine`, with fresh call counts; returns the module."""
    global machine, initialized
    machine = new_machine
    initialized = 0
    calls.clear()
    return sys.modules[__name__]


def install(monkeypatch: pytest.MonkeyPatch, new_machine: Machine) -> types.ModuleType:
    """Put the fake in `sys.modules["pynvml"]` for one test, answering for `new_machine`."""
    module = use(new_machine)
    monkeypatch.setitem(sys.modules, "pynvml", module)
    return module
