"""Doctor checks of the host: ACLs, PAM, database, Redis, the agent, docker, clock."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import tempfile
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit

from sqlalchemy import text
from sqlalchemy.engine import make_url

from gpulocker import heartbeat
from gpulocker.agent.doctor.base import (
    CLOCK_SKEW_SECONDS,
    EARLIEST_SANE_YEAR,
    FAIL,
    OK,
    PROBE_UID,
    STALE_HEARTBEAT_SECONDS,
    WARN,
    Check,
    HostPaths,
)
from gpulocker.config import Settings
from gpulocker.db import Database, alembic_config, current_revision, head_revision
from gpulocker.models import utcnow

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
