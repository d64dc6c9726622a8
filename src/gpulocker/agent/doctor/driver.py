"""Doctor checks of the GPUs and the driver's device-file options (and `--fix`)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from gpulocker.agent.doctor.base import (
    FAIL,
    LOCKED_MODE,
    MODPROBE_CONF,
    MODPROBE_FIX,
    MODPROBE_LINE,
    OK,
    WARN,
    BackendFactory,
    Check,
    HostPaths,
)
from gpulocker.config import Settings
from gpulocker.gpus import BackendUnavailable, GpuBackend, GpuInfo, make_backend
from gpulocker.inventory import assign_types

# --- GPUs and the driver


def check_gpus(settings: Settings, backend_factory: BackendFactory = make_backend) -> list[Check]:
    """The backend loads, every GPU answers, GPU_CONFIG matches, MIG GPUs are pointed out."""
    try:
        backend = backend_factory(settings)
    except BackendUnavailable as exc:
        fix = (
            "install the NVIDIA driver so that `nvidia-smi` works, "
            "or try GPULocker with `--simulate '{\"4090\": 2}'`"
        )
        return [Check("driver", FAIL, str(exc), fix)]
    try:
        return _gpu_checks(settings, backend)
    finally:
        backend.close()


def _gpu_checks(settings: Settings, backend: GpuBackend) -> list[Check]:
    gpus = backend.inventory()
    checks = [_driver_check(backend, gpus)]
    for problem in getattr(backend, "problems", []):
        fix = "reset the GPU (`nvidia-smi -r`) or reboot; until then it is not managed"
        checks.append(Check("driver", FAIL, problem, fix))
    for sample in backend.sample():
        if not sample.ok:
            fix = "reset the GPU (`nvidia-smi -r`) or reboot; it cannot be allocated meanwhile"
            checks.append(Check("driver", FAIL, f"GPU {sample.index}: {sample.error}", fix))
    checks.append(_types_check(settings, gpus))
    checks += [_mig_check(g) for g in gpus if g.mig]
    checks += _device_file_checks(settings, gpus)
    return checks


def _driver_check(backend: GpuBackend, gpus: list[GpuInfo]) -> Check:
    version = getattr(backend, "driver_version", None)
    found = f"{backend.name}: {len(gpus)} GPU(s)" + (f", driver {version}" if version else "")
    reason = getattr(backend, "fallback_reason", None)
    if reason:
        return Check(
            "driver",
            WARN,
            f"{found} through nvidia-smi, because {reason}",
            "make NVML loadable (libnvidia-ml.so.1 ships with the driver): "
            "nvidia-smi costs two processes per sample",
        )
    return Check("driver", OK, found)


def _types_check(settings: Settings, gpus: list[GpuInfo]) -> Check:
    try:
        typed = assign_types(settings.gpu_config, gpus)
    except ValueError as exc:
        return Check("gpu types", FAIL, str(exc), "make GPU_CONFIG name the GPU indices above")
    groups: dict[str, list[int]] = {}
    for t in typed:
        groups.setdefault(t.gpu_type, []).append(t.info.index)
    text_ = ", ".join(f"{k}: {v}" for k, v in groups.items()) or "no GPU"
    origin = "from GPU_CONFIG" if settings.gpu_config else "auto-detected (GPU_CONFIG is empty)"
    return Check("gpu types", OK, f"{text_} ({origin})")


def _mig_check(gpu: GpuInfo) -> Check:
    return Check(
        "mig",
        WARN,
        f"GPU {gpu.index} ({gpu.name}) is in MIG mode: it is allocated as one whole GPU "
        "(its MIG instances cannot be allocated on their own), NVML reports no utilization "
        "for it so idle GPUs are not revoked, and /dev/nvidia-caps is not restricted",
        f"to manage it fully, disable MIG: `nvidia-smi -i {gpu.index} -mig 0` and reset the GPU",
    )


def _device_file_checks(settings: Settings, gpus: list[GpuInfo]) -> list[Check]:
    missing = [g for g in gpus if not os.path.exists(g.device)]
    if not missing:
        shown = ", ".join(f"{g.index}->{Path(g.device).name}" for g in gpus)
        return [Check("device files", OK, f"GPU index -> device file: {shown}")]
    return [
        Check(
            "device files",
            WARN,
            f"GPU {g.index}: {g.device} does not exist yet (minor number {g.minor})",
            f"the driver creates it at the first CUDA start; `nvidia-modprobe -c {g.minor}` "
            "creates it now",
        )
        for g in missing
    ]


def read_params(path: Path) -> dict[str, str]:
    """`Key: value` lines of /proc/driver/nvidia/params."""
    params = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition(":")
        if sep:
            params[key.strip()] = value.strip()
    return params


def check_driver_options(settings: Settings, paths: HostPaths) -> list[Check]:
    """The driver's device-file options: can nvidia-modprobe put the files back open?

    It compares each /dev/nvidia* with DeviceFileMode/UID/GID and resets what differs
    whenever any user starts CUDA. Unless ModifyDeviceFiles is 0 or the reference is the
    locked state (mode 0660, uid 0) that is a fail for real GPUs: every reset opens the GPU
    to everyone until the agent restores the file.
    """
    name = "device files"
    if settings.gpu_backend == "simulated":
        return [Check(name, OK, "driver options do not apply to simulated GPUs")]
    try:
        params = read_params(paths.nvidia_params)
    except OSError as exc:
        return [
            Check(name, WARN, f"cannot read {paths.nvidia_params} ({exc.strerror})", MODPROBE_FIX)
        ]
    modify = params.get("ModifyDeviceFiles", "1")
    mode = int(params.get("DeviceFileMode", "438"))  # printed in decimal; 438 = 0666
    uid = int(params.get("DeviceFileUID", "0"))
    gid = params.get("DeviceFileGID", "0")
    if modify == "0":
        return [Check(name, OK, "the driver leaves device files alone (ModifyDeviceFiles: 0)")]
    checks = []
    if mode != LOCKED_MODE:
        checks.append(
            Check(
                name,
                FAIL,
                f"the driver sets /dev/nvidia* back to mode {mode:04o} whenever CUDA starts "
                "(nvidia-modprobe, which any user can trigger), reopening the GPUs until the "
                "agent restores them",
                MODPROBE_FIX,
            )
        )
    else:
        checks.append(
            Check(name, OK, f"the driver keeps device files at mode {mode:04o} (GID {gid})")
        )
    if uid != 0:
        checks.append(
            Check(
                name,
                FAIL,
                f"device files are given to uid {uid} (DeviceFileUID), who can open every GPU",
                MODPROBE_FIX,
            )
        )
    return checks


def needs_modprobe_fix(checks: list[Check]) -> bool:
    """True when a driver-options check failed (what `doctor --fix` repairs)."""
    return any(c.name == "device files" and c.status == FAIL for c in checks)


def modprobe_text() -> str:
    """The whole /etc/modprobe.d/gpulocker.conf that `doctor --fix` writes."""
    return (
        "# Written by `gpulocker doctor --fix`: the driver's reference for /dev/nvidia* is the\n"
        "# locked state GPULocker keeps, so nvidia-modprobe never reopens a GPU (SPEC 13).\n"
        f"{MODPROBE_LINE}\n"
    )


def write_modprobe(paths: HostPaths) -> Path:
    """Write modprobe_text() to <modprobe_dir>/gpulocker.conf, mode 0644, following no link:
    the folder is opened with O_NOFOLLOW, the text goes to a new file created there with
    O_EXCL|O_NOFOLLOW and is renamed over the old name (a link there is replaced, never
    followed)."""
    folder = paths.modprobe_dir
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    tmp = f".{MODPROBE_CONF}.{os.getpid()}.tmp"
    try:
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=dir_fd
        )
        try:
            os.fchmod(fd, 0o644)
            os.write(fd, modprobe_text().encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, MODPROBE_CONF, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        os.fsync(dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    finally:
        os.close(dir_fd)
    return folder / MODPROBE_CONF
