"""The real backend: NVML through nvidia-ml-py (`import pynvml`), no subprocess.

The library is initialised once per backend and the GPU handles are taken once, at the
first inventory; a sample is then one pass over the GPUs with a few NVML calls each. The
device file of a GPU is `/dev/nvidia<minor>`, the minor number coming from NVML: it is not
always the index.

Errors stay where they happen. A field the GPU cannot report (NotSupported, e.g.
utilization in MIG mode, power on some boards) is None in that sample; any other NVML error
on a GPU (GpuIsLost, Unknown, ResetRequired...) fails that GPU's sample only. A GPU whose
handle or minor number cannot be read at start is left out of the inventory (its device
file is unknown, so access to it cannot be managed) and listed in `problems`.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

from gpulocker import procfs
from gpulocker.gpus import BackendUnavailable, GpuInfo, GpuProcess, GpuSample
from gpulocker.models import utcnow

log = logging.getLogger(__name__)
T = TypeVar("T")
MIB = 1024 * 1024

# NVML error codes that mean "this GPU cannot tell this field", not "this GPU is broken".
FIELD_ERRORS = (
    3,  # NVML_ERROR_NOT_SUPPORTED
    4,  # NVML_ERROR_NO_PERMISSION
    6,  # NVML_ERROR_NOT_FOUND
    13,  # NVML_ERROR_FUNCTION_NOT_FOUND (an older driver without that call)
)


def load_nvml() -> ModuleType:
    """Import pynvml and initialise it; BackendUnavailable saying why when it cannot."""
    try:
        nvml = importlib.import_module("pynvml")
    except ImportError as exc:
        raise BackendUnavailable(f"nvidia-ml-py is not installed ({exc})") from None
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        raise BackendUnavailable(f"NVML cannot start: {exc}") from None
    return nvml


def bus_id_text(value: bytes | str) -> str:
    """A PCI bus id as nvidia-smi prints it: 8-digit domain, upper case ("00000000:01:00.0")."""
    text = value.decode() if isinstance(value, bytes) else value
    text = text.strip().upper()
    domain, sep, rest = text.partition(":")
    if sep and rest.count(":") == 1 and len(domain) < 8:
        text = f"{domain.zfill(8)}:{rest}"
    return text


class NvmlBackend:
    """Every NVIDIA GPU of this host, read through NVML."""

    name = "nvml"

    def __init__(self, device_dir: Path) -> None:
        self.device_dir = Path(device_dir)
        self._nvml = load_nvml()
        self._handles: dict[int, Any] = {}
        self._inventory: list[GpuInfo] | None = None
        self.problems: list[str] = []
        self.driver_version = self._driver_version()

    def _driver_version(self) -> str | None:
        try:
            value = self._nvml.nvmlSystemGetDriverVersion()
        except self._nvml.NVMLError:
            return None
        return value.decode() if isinstance(value, bytes) else str(value)

    def _field(self, call: Callable[[], T]) -> T | None:
        """One reading; None when the GPU cannot report it, other errors go up."""
        try:
            return call()
        except self._nvml.NVMLError as exc:
            if getattr(exc, "value", None) in FIELD_ERRORS:
                return None
            raise

    def inventory(self) -> list[GpuInfo]:
        """The GPUs found at the first call (NVML does not add GPUs without a driver reload)."""
        if self._inventory is None:
            self._inventory = self._read_inventory()
        return list(self._inventory)

    def _read_inventory(self) -> list[GpuInfo]:
        nvml = self._nvml
        gpus = []
        for index in range(nvml.nvmlDeviceGetCount()):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                info = self._describe(index, handle)
            except nvml.NVMLError as exc:
                self._problem(f"GPU {index}: {exc}; it is not managed")
                continue
            if info is None:
                self._problem(f"GPU {index}: NVML gives no minor number; it is not managed")
                continue
            self._handles[index] = handle
            gpus.append(info)
        return gpus

    def _problem(self, message: str) -> None:
        log.error("%s", message)
        self.problems.append(message)

    def _describe(self, index: int, handle: Any) -> GpuInfo | None:
        nvml = self._nvml
        minor = self._field(lambda: nvml.nvmlDeviceGetMinorNumber(handle))
        if minor is None:
            return None
        name = self._field(lambda: nvml.nvmlDeviceGetName(handle))
        uuid = self._field(lambda: nvml.nvmlDeviceGetUUID(handle))
        pci = self._field(lambda: nvml.nvmlDeviceGetPciInfo(handle))
        memory = self._field(lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
        mig = self._field(lambda: nvml.nvmlDeviceGetMigMode(handle))
        return GpuInfo(
            index=index,
            name=_text(name) or "unknown",
            minor=int(minor),
            device=str(self.device_dir / f"nvidia{minor}"),
            memory_total_mib=int(memory.total // MIB) if memory is not None else 0,
            uuid=_text(uuid),
            pci_bus_id=bus_id_text(pci.busId) if pci is not None else None,
            mig=mig is not None and mig[0] == 1,
        )

    def sample(self) -> list[GpuSample]:
        """One pass over the GPUs; each GPU's failure stays in its own sample."""
        now = utcnow()
        return [self._sample_one(gpu.index, now) for gpu in self.inventory()]

    def _sample_one(self, index: int, now: datetime) -> GpuSample:
        nvml, handle = self._nvml, self._handles[index]
        try:
            util = self._field(lambda: nvml.nvmlDeviceGetUtilizationRates(handle))
            memory = self._field(lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
            temperature = self._field(
                lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)
            )
            power_mw = self._field(lambda: nvml.nvmlDeviceGetPowerUsage(handle))
            processes = self._processes(handle)
        except nvml.NVMLError as exc:
            return GpuSample(index=index, at=now, ok=False, error=str(exc))
        return GpuSample(
            index=index,
            at=now,
            utilization=float(util.gpu) if util is not None else None,
            memory_used_mib=memory.used / MIB if memory is not None else None,
            memory_total_mib=memory.total / MIB if memory is not None else None,
            temperature_c=float(temperature) if temperature is not None else None,
            power_w=power_mw / 1000 if power_mw is not None else None,
            processes=processes,
        )

    def _processes(self, handle: Any) -> list[GpuProcess]:
        """Compute, graphics and MPS client processes, once each, with their owner from /proc
        (an nvidia-ml-py without the MPS call is read without it)."""
        nvml = self._nvml
        found: dict[int, float] = {}
        queries = [
            nvml.nvmlDeviceGetComputeRunningProcesses,
            nvml.nvmlDeviceGetGraphicsRunningProcesses,
        ]
        mps = getattr(nvml, "nvmlDeviceGetMPSComputeRunningProcesses", None)
        if mps is not None:
            queries.append(mps)
        for query in queries:
            for proc in self._field(lambda q=query: q(handle)) or []:  # type: ignore[misc]
                used = proc.usedGpuMemory
                mib = used / MIB if used is not None else 0.0
                found[proc.pid] = max(found.get(proc.pid, 0.0), mib)
        return owned_processes(found)

    def close(self) -> None:
        """Shut NVML down (once)."""
        if self._nvml is None:
            return
        try:
            self._nvml.nvmlShutdown()
        except self._nvml.NVMLError as exc:
            log.warning("NVML shutdown: %s", exc)
        self._nvml = None  # type: ignore[assignment]


def _text(value: bytes | str | None) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else value


def owned_processes(
    memory_by_pid: dict[int, float], names: dict[int, str] | None = None
) -> list[GpuProcess]:
    """GpuProcess entries with owners from /proc; processes already gone are left out.

    `names` is what the backend was told a process is called, used only when /proc has no
    name for it.
    """
    processes = []
    for pid, mib in sorted(memory_by_pid.items()):
        uid = procfs.process_owner(pid)
        if uid is None:  # ended between the GPU query and now
            continue
        name = procfs.process_name(pid) or (names or {}).get(pid, "")
        processes.append(GpuProcess(pid, uid, procfs.user_name(uid), mib, name))
    return processes
