"""GPU backends: what GPUs a host has and, every sample, what they are doing.

Three backends share one small interface: `nvml` (the real one), `smi` (parses
nvidia-smi) and `simulated` (files instead of GPUs, real processes). Only the agent
talks to a backend; everyone else reads what the agent published.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from gpulocker.config import Settings

log = logging.getLogger(__name__)


class BackendUnavailable(RuntimeError):
    """The backend cannot run on this host (no driver, no nvidia-smi...); says what to do."""


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as detected: identity and the device file that controls access to it."""

    index: int
    name: str
    minor: int
    device: str
    memory_total_mib: int
    uuid: str | None = None
    pci_bus_id: str | None = None
    mig: bool = False


@dataclass(frozen=True)
class GpuProcess:
    """A process using a GPU, with its real owner. `ignored`: an IGNORED_PROCESSES match
    (shown, never a violation, never a holder's activity)."""

    pid: int
    uid: int | None
    user: str
    memory_mib: float = 0.0
    name: str = ""
    ignored: bool = False


@dataclass
class GpuSample:
    """One live reading of one GPU. `ok` is False when the GPU failed (then `error` says why)."""

    index: int
    at: datetime
    ok: bool = True
    error: str | None = None
    utilization: float | None = None
    memory_used_mib: float | None = None
    memory_total_mib: float | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    processes: list[GpuProcess] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (what is published for the web workers). Field by field, not
        `asdict` (a deep copy): it runs for every GPU at every sample."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["at"] = self.at.isoformat()
        data["processes"] = [
            {f.name: getattr(p, f.name) for f in fields(p)} for p in self.processes
        ]
        return data


class GpuBackend(Protocol):
    """What every backend provides."""

    name: str

    def inventory(self) -> list[GpuInfo]:
        """Every GPU of this host."""
        ...

    def sample(self) -> list[GpuSample]:
        """One reading per GPU; a failing GPU gives a sample with ok=False, never an exception."""
        ...

    def close(self) -> None:
        """Release the library or handles."""
        ...


NO_DRIVER = "no NVIDIA driver found; run with --simulate to try GPULocker without GPUs"


def make_backend(settings: Settings) -> GpuBackend:
    """The backend GPU_BACKEND names. `nvml` falls back to `smi` when NVML cannot load but
    nvidia-smi works; with neither, BackendUnavailable says so in one line (NO_DRIVER)."""
    if settings.gpu_backend == "simulated":
        from gpulocker.gpus.simulated import SimulatedBackend

        return SimulatedBackend(settings.gpu_config, settings.device_path, settings.gpu_host)
    from gpulocker.gpus.smi import SmiBackend

    if settings.gpu_backend == "smi":
        try:
            return SmiBackend(settings.device_path)
        except BackendUnavailable as exc:
            log.info("smi backend: %s", exc)
            raise BackendUnavailable(NO_DRIVER) from None
    from gpulocker.gpus.nvml import NvmlBackend

    try:
        return NvmlBackend(settings.device_path)
    except BackendUnavailable as nvml_error:
        reason = str(nvml_error)
    try:
        backend = SmiBackend(settings.device_path, fallback_reason=reason)
    except BackendUnavailable as exc:
        log.info("nvml backend: %s; smi backend: %s", reason, exc)
        raise BackendUnavailable(NO_DRIVER) from None
    log.warning("%s; falling back to nvidia-smi", reason)
    return backend
