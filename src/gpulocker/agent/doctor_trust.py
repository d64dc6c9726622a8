"""Doctor's trust checks (SPEC §12): what a local student could read, write or reach.

Returns (name, status, message, fix) tuples that doctor turns into its Checks, so this
module needs nothing from doctor (no import cycle).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from sqlalchemy.engine import make_url

from gpulocker import safefs
from gpulocker.config import Settings
from gpulocker.db import normalize_url

Finding = tuple[str, str, str, str]
OK, WARN, FAIL = "ok", "warn", "fail"


def check_trust(settings: Settings) -> list[Finding]:
    """Every trust check, in the order an admin would fix them."""
    return [
        *_private(settings),
        *_root_only(settings.device_path, "DEVICE_DIR"),
        *_root_only(settings.local_socket_path.parent, "socket folder"),
        *_redis_auth(settings),
    ]


def _readable_by_others(path: Path) -> str | None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    if info.st_mode & 0o007:
        return f"{path} is open to others (mode {stat.S_IMODE(info.st_mode):04o})"
    return None


def _private(settings: Settings) -> list[Finding]:
    paths = [Path(settings.state_dir)]
    url = make_url(normalize_url(settings.database_url))
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        paths += [Path(f"{url.database}{s}") for s in ("", "-wal", "-shm")]
    if settings.log_file:
        paths.append(Path(settings.log_file))
    problems = [p for p in map(_readable_by_others, paths) if p]
    if problems:
        fix = "chmod o-rwx on them (GPULocker fixes them at its next start)"
        return [("state", FAIL, "; ".join(problems), fix)]
    return [("state", OK, "state folder, database and log are not readable by others", "")]


def _root_only(folder: Path, what: str) -> list[Finding]:
    name = "device dir" if what == "DEVICE_DIR" else "socket dir"
    try:
        safefs.check_root_dir(folder, what)
    except safefs.UnsafePath as exc:
        return [(name, FAIL, str(exc), f"chown root {folder} && chmod go-w {folder}")]
    return [(name, OK, f"{folder} can be written by root only", "")]


def _redis_auth(settings: Settings) -> list[Finding]:
    """A Redis on TCP that answers without a password lets any user on the host (or the
    network) write the live hash and the login throttle."""
    url = settings.effective_redis_url
    if not url:
        return []
    parts = urlsplit(url)
    if parts.scheme == "unix":
        why = _readable_by_others(Path(parts.path))
        if why:
            return [("redis auth", FAIL, f"Redis socket {why}", "unixsocketperm 660")]
        return [("redis auth", OK, "Redis is on a unix socket others cannot open", "")]
    from redis import Redis
    from redis.exceptions import AuthenticationError, RedisError, ResponseError

    bare = parts._replace(netloc=f"{parts.hostname or ''}:{parts.port or 6379}")
    shown = urlunsplit(bare._replace(path="", query=""))
    client = Redis.from_url(urlunsplit(bare), socket_timeout=3, socket_connect_timeout=3)
    try:
        client.ping()
    except (AuthenticationError, ResponseError):
        return [("redis auth", OK, f"{shown} wants a password", "")]
    except RedisError as exc:
        return [("redis auth", WARN, f"{shown}: cannot tell ({exc})", "")]
    finally:
        client.close()
    return [
        (
            "redis auth",
            FAIL,
            f"{shown} answers without a password: any user can reach it",
            "set requirepass (or an ACL user) and put the password in REDIS_URL",
        )
    ]
