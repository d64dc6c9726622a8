"""Simulated GPUs: a regular file per GPU stands in for /dev/nvidiaN.

The file is created 0666 when missing (as the NVIDIA driver does), so ACL enforcement
is exercised on a real file. A GPU's processes are the real processes that hold its file
open, found by the file's inode whatever path they opened it by. Load comes from `nvidia<id>.load` beside it: `{"utilization": 80, "memory_mib":
10240}`, or `{"error": "GPU is lost"}` for a failed GPU.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import uuid
from pathlib import Path
from typing import Any

from gpulocker import procfs, safefs
from gpulocker.gpus import GpuInfo, GpuProcess, GpuSample
from gpulocker.models import utcnow
from gpulocker.safefs import make_root_dir

MEMORY_BY_TYPE_MIB = {"4090": 24564, "3090": 24576, "a100": 81920, "h100": 81559, "h200": 143771}
DEFAULT_MEMORY_MIB = 16384
_UUID_NAMESPACE = uuid.UUID("6c1d3b0e-4a52-5f0e-9d3c-6f1e2b7a9c41")  # GPULocker's, fixed


def simulated_uuid(host: str, gpu_id: int) -> str:
    """A stable UUID of the same shape as a real GPU's (`GPU-` + 8-4-4-4-12 hex), so the
    CUDA line and its shell check see on simulated GPUs what they see on real ones."""
    return f"GPU-{uuid.uuid5(_UUID_NAMESPACE, f'{host}/{gpu_id}')}"


def device_file(device_dir: Path, gpu_id: int) -> Path:
    """The file that stands for GPU `gpu_id`."""
    return device_dir / f"nvidia{gpu_id}"


def load_file(device_dir: Path, gpu_id: int) -> Path:
    """The JSON file holding GPU `gpu_id`'s simulated load."""
    return device_dir / f"nvidia{gpu_id}.load"


def write_load(
    device_dir: Path,
    gpu_id: int,
    utilization: float = 0.0,
    memory_mib: float = 0.0,
    error: str | None = None,
) -> Path:
    """Set a simulated GPU's load (atomically: readers never see half a file)."""
    data: dict[str, Any] = (
        {"error": error} if error else {"utilization": utilization, "memory_mib": memory_mib}
    )
    path = load_file(device_dir, gpu_id)
    device_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".load.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    tmp.chmod(0o644)
    os.replace(tmp, path)
    return path


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except OSError:
        return None


def ensure_device_file(path: Path) -> bool:
    """Create the file 0666 if it is missing, as the driver would. True if it was created.

    As root: the folder must be root's and writable by nobody else, and the file is created
    with O_EXCL|O_NOFOLLOW and chmodded through its fd, so a planted (even dangling) symlink
    is refused rather than followed (SPEC §12). It is made under a temporary name and
    linked into place, so it appears with its mode at once, as a driver's `mknod` does
    (the agent's watch may look at it the moment it appears).
    """
    make_root_dir(path.parent, 0o755, "DEVICE_DIR")
    if path.exists() or path.is_symlink():
        fd = safefs.open_regular(path)  # refuses a symlink or a file of the wrong type
        os.close(fd)
        return False
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    fd = safefs.open_nofollow(temp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    try:
        os.fchmod(fd, 0o666)  # as the driver does; the umask must not narrow it
        os.link(temp, path, follow_symlinks=False)  # fails if something took the name
    except FileExistsError:
        fd2 = safefs.open_regular(path)
        os.close(fd2)
        return False
    finally:
        os.close(fd)
        os.unlink(temp)
    return True


class SimulatedBackend:
    """GPUs from GPU_CONFIG (type -> ids), as files under DEVICE_DIR."""

    name = "simulated"
    sweeps_descriptors = True  # its processes already are the descriptor sweep (`sweep`)

    def __init__(
        self, gpu_config: dict[str, list[int]], device_dir: Path, host: str | None = None
    ) -> None:
        if not gpu_config:
            from gpulocker.gpus import BackendUnavailable

            raise BackendUnavailable(
                "simulated GPUs need GPU_CONFIG or --simulate, e.g. --simulate '{\"4090\": 4}'"
            )
        self.device_dir = Path(device_dir)
        self.host = host or socket.gethostname()
        self.types = {gpu_id: t for t, ids in gpu_config.items() for gpu_id in ids}
        # Whole by default; the agent hands in its own, incremental one (agent/holders.py).
        self.sweep = procfs.DescriptorSweep()
        self._gpus: list[GpuInfo] | None = None

    def inventory(self) -> list[GpuInfo]:
        """One GPU per configured id; the device files are created if missing."""
        if self._gpus is None:
            self._gpus = [self._info(gpu_id, t) for gpu_id, t in sorted(self.types.items())]
        for gpu in self._gpus:  # every sample: a driver re-creates a missing file
            info = _lstat(gpu.device)
            if info is None or not stat.S_ISREG(info.st_mode):
                ensure_device_file(Path(gpu.device))  # creates it, or refuses what is there
        return list(self._gpus)

    def _info(self, gpu_id: int, gpu_type: str) -> GpuInfo:
        return GpuInfo(
            index=gpu_id,
            name=f"NVIDIA {gpu_type} (simulated)",
            minor=gpu_id,
            device=str(device_file(self.device_dir, gpu_id)),
            memory_total_mib=MEMORY_BY_TYPE_MIB.get(gpu_type.lower(), DEFAULT_MEMORY_MIB),
            uuid=simulated_uuid(self.host, gpu_id),
            pci_bus_id=f"00000000:{gpu_id + 1:02X}:00.0",
        )

    def sample(self) -> list[GpuSample]:
        """Read every load file and find the processes holding each device file."""
        now = utcnow()
        gpus = self.inventory()
        held = self.sweep.sweep(g.device for g in gpus)
        return [self._sample_one(g, held.get(g.device, []), now) for g in gpus]

    def _sample_one(
        self, gpu: GpuInfo, holders: list[procfs.OpenFileHolder], now: Any
    ) -> GpuSample:
        load = self._read_load(gpu.index)
        if "error" in load:
            return GpuSample(index=gpu.index, at=now, ok=False, error=str(load["error"]))
        utilization = float(load.get("utilization", 0))
        memory = float(load.get("memory_mib", 0))
        share = memory / len(holders) if holders else 0.0
        return GpuSample(
            index=gpu.index,
            at=now,
            utilization=utilization,
            memory_used_mib=memory,
            memory_total_mib=float(gpu.memory_total_mib),
            temperature_c=round(30 + utilization * 0.5, 1),
            power_w=round(50 + utilization * 3, 1),
            processes=[GpuProcess(h.pid, h.uid, h.user, share, h.name) for h in holders],
        )

    def _read_load(self, gpu_id: int) -> dict[str, Any]:
        try:
            data = json.loads(load_file(self.device_dir, gpu_id).read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            return {"error": f"unreadable load file: {exc}"}
        return data if isinstance(data, dict) else {"error": "load file is not a JSON object"}

    def close(self) -> None:
        """Nothing to release."""
