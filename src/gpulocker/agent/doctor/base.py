"""What a doctor check is, and the host files the checks read."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gpulocker.config import Settings
from gpulocker.gpus import GpuBackend

OK, WARN, FAIL = "ok", "warn", "fail"
STALE_HEARTBEAT_SECONDS = 60.0
CLOCK_SKEW_SECONDS = 5.0
EARLIEST_SANE_YEAR = 2025
PROBE_UID = 65534  # "nobody": the named entry written on the probe file
# The driver's reference state made the locked one: nvidia-modprobe then finds nothing to
# reset (a fail-closed file reads 0660: the ACL mask shows in the group bits).
MODPROBE_LINE = (
    "options nvidia NVreg_DeviceFileMode=0660 NVreg_DeviceFileUID=0 NVreg_DeviceFileGID=0"
)
MODPROBE_ALTERNATIVE = "options nvidia NVreg_ModifyDeviceFiles=0"
MODPROBE_CONF = "gpulocker.conf"
MODPROBE_FIX = (
    f"write `{MODPROBE_LINE}` (or `{MODPROBE_ALTERNATIVE}`) to "
    f"/etc/modprobe.d/{MODPROBE_CONF} (`gpulocker doctor --fix` does it), "
    "run `update-initramfs -u` and reboot"
)
LOCKED_MODE = 0o660


@dataclass(frozen=True)
class Check:
    """One finding: which check, ok/warn/fail, what was found, and how to fix it."""

    name: str
    status: str
    message: str
    fix: str = ""


@dataclass(frozen=True)
class HostPaths:
    """The host files the checks read (tests point them at their own)."""

    nvidia_params: Path = Path("/proc/driver/nvidia/params")
    pam_dir: Path = Path("/etc/pam.d")
    group_file: Path = Path("/etc/group")
    passwd_file: Path = Path("/etc/passwd")
    modprobe_dir: Path = Path("/etc/modprobe.d")

    @classmethod
    def under(cls, root: Path) -> HostPaths:
        """The same files below `root` instead of / (`doctor --root`, for tests and images)."""
        base = cls()
        moved = {k: root / Path(v).relative_to("/") for k, v in vars(base).items()}
        return cls(**moved)


BackendFactory = Callable[[Settings], GpuBackend]
