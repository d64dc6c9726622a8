"""`gpulocker doctor`: is this host ready to enforce GPU access? Each check says ok, warn or
fail, and what to do about anything that is not ok.

The checks read the host as it is (the driver's options, the filesystem under DEVICE_DIR,
PAM, the database, Redis, the agent's heartbeat, the docker group, the clock) and change
nothing, except a temporary file in DEVICE_DIR to prove that ACLs can be set there. The
files they read are in `HostPaths`, so tests point them at files of their own.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit

from sqlalchemy import text
from sqlalchemy.engine import make_url

from gpulocker import heartbeat
from gpulocker.agent import doctor_trust
from gpulocker.config import Settings
from gpulocker.db import Database, alembic_config, current_revision, head_revision
from gpulocker.gpus import BackendUnavailable, GpuBackend, GpuInfo, make_backend
from gpulocker.inventory import assign_types
from gpulocker.models import utcnow

OK, WARN, FAIL = "ok", "warn", "fail"
STALE_HEARTBEAT_SECONDS = 60.0
CLOCK_SKEW_SECONDS = 5.0
EARLIEST_SANE_YEAR = 2025
PROBE_UID = 65534  # "nobody": the named entry written on the probe file
MODPROBE_FIX = (
    "write `options nvidia NVreg_DeviceFileMode=0660 NVreg_DeviceFileUID=0 "
    "NVreg_DeviceFileGID=0` (or `options nvidia NVreg_ModifyDeviceFiles=0`) to "
    "/etc/modprobe.d/gpulocker.conf, run `update-initramfs -u` and reboot"
)


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


BackendFactory = Callable[[Settings], GpuBackend]


def run_checks(
    settings: Settings,
    paths: HostPaths | None = None,
    backend_factory: BackendFactory = make_backend,
) -> list[Check]:
    """Every check, in the order an admin would fix things. A check that crashes is a fail."""
    paths = paths or HostPaths()
    checks: list[Check] = []
    steps: list[tuple[str, Callable[[], list[Check]]]] = [
        # first, before opening the database fixes its mode: what the host is like now
        ("trust", lambda: [Check(*found) for found in doctor_trust.check_trust(settings)]),
        ("driver", lambda: check_gpus(settings, backend_factory)),
        ("device files", lambda: check_driver_options(settings, paths)),
        ("acl", lambda: check_acl(settings)),
        ("pam", lambda: check_pam(settings, paths)),
        ("database", lambda: check_database(settings)),
        ("redis", lambda: check_redis(settings)),
        ("agent", lambda: check_heartbeat(settings)),
        ("docker", lambda: check_docker(paths)),
        ("exempt", lambda: check_exempt(settings, paths)),
        ("clock", lambda: check_clock(settings)),
    ]
    for name, step in steps:
        try:
            checks += step()
        except Exception as exc:  # one broken check must not hide the others
            checks.append(Check(name, FAIL, f"the check itself failed: {exc!r}"))
    return checks


def render(checks: list[Check]) -> str:
    """The report: one line per check, its fix indented below, and a summary line."""
    width = max((len(c.name) for c in checks), default=0)
    lines = []
    for check in checks:
        lines.append(f"{check.status:<5} {check.name:<{width}}  {check.message}")
        if check.fix:
            lines.append(f"{'':<5} {'':<{width}}  fix: {check.fix}")
    counts = {s: sum(c.status == s for c in checks) for s in (OK, WARN, FAIL)}
    lines.append(f"doctor: {counts[OK]} ok, {counts[WARN]} warn, {counts[FAIL]} fail")
    return "\n".join(lines)


def exit_status(checks: list[Check]) -> int:
    """1 when anything failed (warnings alone are 0)."""
    return 1 if any(c.status == FAIL for c in checks) else 0


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
    """The driver's device-file options: does it re-open files between reconciles?"""
    name = "device files"
    if settings.gpu_backend == "simulated":
        return [Check(name, OK, "driver options do not apply to simulated GPUs")]
    try:
        params = read_params(paths.nvidia_params)
    except OSError as exc:
        return [
            Check(name, WARN, f"cannot read {paths.nvidia_params} ({exc.strerror})", MODPROBE_FIX)
        ]
    checks = []
    modify = params.get("ModifyDeviceFiles", "1")
    mode = int(params.get("DeviceFileMode", "438"))  # printed in decimal; 438 = 0666
    uid = int(params.get("DeviceFileUID", "0"))
    gid = params.get("DeviceFileGID", "0")
    if modify == "0":
        checks.append(
            Check(name, OK, "the driver leaves device files alone (ModifyDeviceFiles: 0)")
        )
    elif mode & 0o007:
        checks.append(
            Check(
                name,
                WARN,
                f"the driver sets /dev/nvidia* back to mode {mode:04o} whenever CUDA starts "
                "(nvidia-modprobe), which opens every GPU to everyone until the next reconcile "
                f"(RECONCILE_SECONDS={settings.reconcile_seconds:g})",
                MODPROBE_FIX,
            )
        )
    else:
        checks.append(
            Check(name, OK, f"the driver keeps device files at mode {mode:04o} (GID {gid})")
        )
    if modify != "0" and uid != 0:
        checks.append(
            Check(
                name,
                WARN,
                f"device files are given to uid {uid} (DeviceFileUID), who can open every GPU",
                "set NVreg_DeviceFileUID=0 (" + MODPROBE_FIX + ")",
            )
        )
    return checks


# --- The host


def _probe_dir(settings: Settings) -> Path | None:
    directory = settings.device_path
    if settings.gpu_backend == "simulated":  # created at start: test where it will be
        while not directory.exists() and directory != directory.parent:
            directory = directory.parent
    return directory if directory.is_dir() else None


def check_acl(settings: Settings) -> list[Check]:
    """Set the ACL GPULocker writes on a temporary file in DEVICE_DIR and read it back."""
    from gpulocker.agent import access

    directory = _probe_dir(settings)
    if directory is None:
        return [
            Check(
                "acl", FAIL, f"DEVICE_DIR {settings.device_path} does not exist", "set DEVICE_DIR"
            )
        ]
    try:
        with _temp_file(directory) as probe:
            access.apply(probe, [PROBE_UID])
            works = access.compliant(access.read(probe), [PROBE_UID])
    except PermissionError:
        return [
            Check("acl", WARN, f"cannot write in {directory}", "run `gpulocker doctor` as root")
        ]
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.ENOTSUP):
            return [
                Check(
                    "acl",
                    FAIL,
                    f"the filesystem of {directory} does not support POSIX ACLs",
                    "mount it with ACLs (ext4: -o acl; tmpfs/devtmpfs: a kernel with "
                    "CONFIG_TMPFS_POSIX_ACL)",
                )
            ]
        raise
    if not works:
        return [Check("acl", FAIL, f"an ACL set in {directory} did not read back the same")]
    return [Check("acl", OK, f"POSIX ACLs work in {directory}")]


@contextlib.contextmanager
def _temp_file(directory: Path) -> Iterator[str]:
    fd, name = tempfile.mkstemp(prefix=".gpulocker-doctor-", dir=directory)
    os.close(fd)
    try:
        yield name
    finally:
        os.unlink(name)


def check_pam(settings: Settings, paths: HostPaths) -> list[Check]:
    """The PAM service file sign-in uses exists (a missing one silently means `other`)."""
    service = paths.pam_dir / settings.pam_service
    fix = (
        "create /etc/pam.d/gpulocker with `@include common-auth` and `@include common-account` "
        "and set PAM_SERVICE=gpulocker"
    )
    if service.is_file():
        return [Check("pam", OK, f"PAM service {settings.pam_service!r}: {service}")]
    other = paths.pam_dir / "other"
    if other.is_file():
        return [Check("pam", WARN, f"no {service}: PAM falls back to {other}", fix)]
    return [Check("pam", FAIL, f"no {service} and no {other}: nobody can sign in", fix)]


def check_database(settings: Settings) -> list[Check]:
    """The database answers and has the schema this version expects."""
    url = make_url(settings.database_url.replace("postgresql://", "postgresql+psycopg://", 1))
    shown = url.render_as_string(hide_password=True)
    upgrade = "run `gpulocker db upgrade` (also done at every start)"
    if url.get_backend_name() == "sqlite" and url.database and not Path(url.database).exists():
        return [Check("database", WARN, f"no database yet at {url.database}", upgrade)]
    with _database(settings) as database:
        try:
            current = current_revision(database.engine)
        except Exception as exc:  # any driver error means "not reachable"
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            return [Check("database", FAIL, f"cannot reach {shown}: {first}", "check DATABASE_URL")]
    head = head_revision()
    if current == head:
        return [Check("database", OK, f"{shown} at revision {current} (current)")]
    if current is None:
        return [Check("database", WARN, f"{shown} has no schema yet", upgrade)]
    if not _known_revision(current):
        return [
            Check(
                "database",
                FAIL,
                f"{shown} is at revision {current}, unknown to this version (a newer GPULocker?)",
                "upgrade GPULocker on this host",
            )
        ]
    return [
        Check("database", WARN, f"{shown} at revision {current}; this version has {head}", upgrade)
    ]


@contextlib.contextmanager
def _database(settings: Settings) -> Iterator[Database]:
    database = (
        Database(settings.database_url, connect_args={"connect_timeout": 5})
        if (not settings.database_url.startswith("sqlite"))
        else Database(settings.database_url)
    )
    try:
        yield database
    finally:
        database.dispose()


def _known_revision(revision: str) -> bool:
    from alembic.script import ScriptDirectory
    from alembic.util.exc import CommandError

    try:
        return ScriptDirectory.from_config(alembic_config()).get_revision(revision) is not None
    except CommandError:
        return False


def check_redis(settings: Settings) -> list[Check]:
    """Redis answers, when it is configured."""
    url = settings.effective_redis_url
    if not url:
        return [Check("redis", OK, "not configured (a single host needs none)")]
    from redis import Redis
    from redis.exceptions import RedisError

    parts = urlsplit(url)
    shown = f"{parts.scheme}://{parts.hostname or ''}:{parts.port or ''}{parts.path}"
    client = Redis.from_url(url, socket_timeout=3, socket_connect_timeout=3)
    try:
        client.ping()
    except RedisError as exc:
        return [
            Check("redis", FAIL, f"{shown} does not answer: {exc}", "start Redis or fix REDIS_URL")
        ]
    finally:
        client.close()
    return [Check("redis", OK, f"{shown} answers")]


def check_heartbeat(settings: Settings) -> list[Check]:
    """The agent of this host beats (without it nothing is enforced)."""
    name = heartbeat.agent_name(settings.gpu_host)
    start = "start it: `gpulocker agent` (or `gpulocker serve`), under systemd in production"
    if (
        settings.database_url.startswith("sqlite")
        and not Path(make_url(settings.database_url).database or "").exists()
    ):
        return [Check("agent", WARN, f"the agent of {settings.gpu_host} has never run", start)]
    with _database(settings) as database:
        try:
            with database.session() as session:
                age = heartbeat.age_seconds(session, name)
        except Exception as exc:  # reported by the database check
            return [Check("agent", WARN, f"heartbeat not readable ({type(exc).__name__})")]
    if age is None:
        return [Check("agent", WARN, f"the agent of {settings.gpu_host} has never run", start)]
    if age < -CLOCK_SKEW_SECONDS:
        return [
            Check(
                "agent",
                WARN,
                f"the agent's last heartbeat is {-age:.0f} s in the future",
                "synchronize the clocks of the hosts (NTP)",
            )
        ]
    if age > STALE_HEARTBEAT_SECONDS:
        return [
            Check(
                "agent",
                FAIL,
                f"the agent of {settings.gpu_host} last beat {age:.0f} s ago: "
                "GPU access is not being enforced",
                "`systemctl status gpulocker-agent` and `journalctl -u gpulocker-agent`; " + start,
            )
        ]
    return [Check("agent", OK, f"the agent of {settings.gpu_host} beat {max(age, 0):.0f} s ago")]


def _read_table(path: Path) -> list[list[str]]:
    try:
        return [
            line.split(":") for line in path.read_text().splitlines() if line and line[0] != "#"
        ]
    except OSError:
        return []


def docker_members(paths: HostPaths) -> list[str] | None:
    """Users in the `docker` group (also by primary group); None if there is no such group."""
    group = next((row for row in _read_table(paths.group_file) if row[0] == "docker"), None)
    if group is None or len(group) < 3:
        return None
    members = {m for m in (group[3] if len(group) > 3 else "").split(",") if m}
    for row in _read_table(paths.passwd_file):
        if len(row) > 3 and row[3] == group[2]:
            members.add(row[0])
    return sorted(members)


def check_docker(paths: HostPaths) -> list[Check]:
    """Members of `docker` get around device ACLs: rootful Docker opens the devices for them."""
    members = docker_members(paths)
    if members is None:
        return [Check("docker", OK, "no docker group")]
    if not members:
        return [Check("docker", OK, "the docker group has no members")]
    return [
        Check(
            "docker",
            WARN,
            f"members of the docker group can run containers that open any GPU, whatever the "
            f"device ACLs say: {', '.join(members)}",
            "use rootless Docker (it respects device permissions), or `gpasswd -d USER docker`",
        )
    ]


def check_exempt(settings: Settings, paths: HostPaths) -> list[Check]:
    """nvidia-persistenced holds every GPU open: unless exempt, it is a violator."""
    checks = []
    exists = any(row[0] == "nvidia-persistenced" for row in _read_table(paths.passwd_file))
    if "nvidia-persistenced" in settings.exempt_users:
        checks.append(Check("exempt", OK, "nvidia-persistenced is in EXEMPT_USERS"))
    else:
        checks.append(
            Check(
                "exempt",
                FAIL if exists else WARN,
                "nvidia-persistenced is not in EXEMPT_USERS: it keeps every GPU open, so it "
                "would be reported as a violator (and killed, with KILL_VIOLATORS)",
                "add nvidia-persistenced to EXEMPT_USERS",
            )
        )
    if "root" not in settings.exempt_users:
        checks.append(
            Check(
                "exempt",
                WARN,
                "root is not in EXEMPT_USERS: root's GPU processes are violations",
                "add root to EXEMPT_USERS",
            )
        )
    return checks


def ntp_synchronized() -> bool | None:
    """The kernel's view (adjtimex): False when the clock is not synchronized; None if unknown."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        state = libc.adjtimex(ctypes.create_string_buffer(512))  # zeroed: read only
    except (OSError, AttributeError):
        return None
    if state < 0:
        return None
    return state != 5  # TIME_ERROR: the clock is not synchronized


def check_clock(settings: Settings, now: datetime | None = None) -> list[Check]:
    """The clock is plausible, synchronized, and agrees with PostgreSQL's."""
    now = now or utcnow()
    if now.year < EARLIEST_SANE_YEAR:
        return [
            Check(
                "clock",
                FAIL,
                f"the clock says {now:%Y-%m-%d %H:%M} UTC",
                "set the time: `timedatectl set-ntp true`",
            )
        ]
    checks = []
    if ntp_synchronized() is False:
        checks.append(
            Check(
                "clock",
                WARN,
                "the clock is not synchronized: expiry times drift",
                "enable time synchronization (`timedatectl set-ntp true`, or chrony)",
            )
        )
    skew = _database_skew(settings)
    if skew is not None and abs(skew) > CLOCK_SKEW_SECONDS:
        checks.append(
            Check(
                "clock",
                WARN,
                f"the database server's clock is {skew:+.0f} s from this host's",
                "synchronize both hosts with NTP",
            )
        )
    return checks or [Check("clock", OK, f"{now:%Y-%m-%d %H:%M:%S} UTC")]


def _database_skew(settings: Settings) -> float | None:
    if settings.database_url.startswith("sqlite"):
        return None
    try:
        with _database(settings) as database, database.engine.connect() as connection:
            theirs = connection.execute(text("SELECT now()")).scalar_one()
    except Exception:  # reported by the database check
        return None
    return (theirs - utcnow()).total_seconds()
