"""Disk usage (SPEC section 9): each user's home size and its filesystem's totals.

Measuring a home can take minutes, so it never happens in a request: `usage_for` and
`usage_all` return what was last measured (cached DISK_CACHE_TIMEOUT_SECONDS) and, when
that is missing or stale, mark the user for a scan. The agent's `disk` step runs the
scans in a background thread, one user after another, and writes the bytes counted so
far while it goes, so a page can show progress (`status` "scanning", `scanned_bytes`).
A scan claims its row with a conditional UPDATE, so two agents never measure the same
home at once; a scan whose process died is taken over after STUCK_SECONDS.

Sizes count allocated blocks (like `du -x`): hard links once, symbolic links not
followed, other filesystems mounted inside a home not entered.
"""

from __future__ import annotations

import logging
import os
import pwd
import selectors
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import and_, or_, select, update

from gpulocker import diskscan
from gpulocker.background import Worker
from gpulocker.config import Settings
from gpulocker.context import Context
from gpulocker.db import Database
from gpulocker.hostview import HostView
from gpulocker.models import DiskUsage, utcnow

log = logging.getLogger(__name__)

PENDING, SCANNING, DONE, ERROR = "pending", "scanning", "done", "error"
PROGRESS_SECONDS = 1.0
STUCK_SECONDS = 3600.0
FIRST_UID, LAST_UID = 1000, 65533  # regular accounts (not system users, not nobody)


def home_of(user: str) -> str | None:
    """The home directory of `user`, or None when there is no such account."""
    try:
        return pwd.getpwnam(user).pw_dir
    except KeyError:
        return None


def local_users() -> list[str]:
    """Every regular account with a home directory on this host (what admins see)."""
    return sorted(
        p.pw_name
        for p in pwd.getpwall()
        if FIRST_UID <= p.pw_uid <= LAST_UID and os.path.isdir(p.pw_dir)
    )


def is_stale(settings: Settings, row: DiskUsage, now: datetime) -> bool:
    """True when the row was never measured or is older than DISK_CACHE_TIMEOUT_SECONDS."""
    if row.measured_at is None:
        return True
    return now - row.measured_at >= timedelta(seconds=settings.disk_cache_timeout_seconds)


def to_dict(settings: Settings, row: DiskUsage, now: datetime) -> dict[str, Any]:
    """The public shape: sizes in bytes, status, progress, and when it was measured."""
    return {
        "user": row.user,
        "home": row.home,
        "used_bytes": row.used_bytes,
        "scanned_bytes": row.scanned_bytes,
        "fs_total_bytes": row.fs_total_bytes,
        "fs_used_bytes": row.fs_used_bytes,
        "fs_free_bytes": row.fs_free_bytes,
        "status": row.status,
        "error": row.error,
        "measured_at": row.measured_at.isoformat() if row.measured_at else None,
        "stale": is_stale(settings, row, now),
    }


def _request(session: Any, settings: Settings, user: str, home: str, now: datetime) -> DiskUsage:
    """The user's row, marked for a scan when it has none or it is stale (no scan here)."""
    row = session.get(DiskUsage, user)
    if row is None:
        row = DiskUsage(user=user, home=home, status=PENDING, scanned_bytes=0)
        session.add(row)
    elif row.status in (DONE, ERROR) and is_stale(settings, row, now):
        row.status, row.home = PENDING, home
    return row


def usage_for(ctx: Context, user: str) -> dict[str, Any]:
    """`user`'s last measurement (at once, never measuring); asks for a scan when stale."""
    now = utcnow()
    home = home_of(user)
    if home is None:
        return {"user": user, "home": None, "status": ERROR, "error": "no such user on this host"}
    with ctx.db.session() as session:
        row = session.get(DiskUsage, user)
        if row is not None and not (
            row.status in (DONE, ERROR) and is_stale(ctx.settings, row, now)
        ):
            return to_dict(ctx.settings, row, now)
    with ctx.db.transaction() as session:
        return to_dict(ctx.settings, _request(session, ctx.settings, user, home, now), now)


def usage_all(ctx: Context) -> list[dict[str, Any]]:
    """Every local user's usage, largest first (unmeasured last); asks for stale scans."""
    now = utcnow()
    with ctx.db.transaction() as session:
        rows = [_request(session, ctx.settings, u, home_of(u) or "", now) for u in local_users()]
        result = [to_dict(ctx.settings, r, now) for r in rows]
    return sorted(
        result, key=lambda d: (d["used_bytes"] is None, -(d["used_bytes"] or 0), d["user"])
    )


# --- measuring


def measure(
    root: str, progress: Callable[[int], None] | None = None, user: str | None = None
) -> int:
    """Bytes allocated under `root` (like `du -sx`); see `measure_tree`."""
    return measure_tree(root, progress, user)[0]


def measure_tree(
    root: str, progress: Callable[[int], None] | None = None, user: str | None = None
) -> tuple[int, str]:
    """(bytes, how it ended) under `root`, measured by a child process with the rights of
    `user` (default: the owner of `root`), calling `progress(bytes so far)` as it goes.

    The enforcement process never walks a user's files itself: the child (diskscan.py)
    has dropped to the user's uid and groups, follows no link, and is bounded in entries,
    time and memory; here we only read its short lines, and kill it past its time.
    """
    command = [sys.executable, "-I", "-c", _SCANNER, root]
    command += [str(diskscan.MAX_ENTRIES), str(diskscan.MAX_SECONDS), str(PROGRESS_SECONDS)]
    proc = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd="/",
        env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"},
        **_as_owner(root, user),
    )
    try:
        return _read_scanner(proc, progress)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


_SCANNER = Path(diskscan.__file__).read_text()


def _as_owner(root: str, user: str | None) -> dict[str, Any]:
    """The subprocess arguments that make the scanner run as the home's user (as root)."""
    if os.geteuid() != 0:
        return {}  # a personal serve measures with its own rights, which are the user's
    entry = pwd.getpwnam(user) if user else pwd.getpwuid(os.lstat(root).st_uid)
    if entry.pw_uid == 0:
        raise OSError(f"refusing to measure {root} as root")
    groups = os.getgrouplist(entry.pw_name, entry.pw_gid)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": groups}


def _read_scanner(
    proc: subprocess.Popen[bytes], progress: Callable[[int], None] | None
) -> tuple[int, str]:
    """Follow the scanner's lines until `done`; OSError when it fails or runs too long."""
    assert proc.stdout is not None
    deadline = time.monotonic() + diskscan.MAX_SECONDS + 30
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not selector.select(timeout=max(0.0, deadline - time.monotonic())):
                continue
            words = proc.stdout.readline(512).decode("ascii", "replace").split(maxsplit=3)
            if not words:
                raise OSError("the disk scan ended without an answer")
            if words[0] == "progress" and len(words) == 2 and words[1].isdigit():
                if progress is not None:
                    progress(int(words[1]))
            elif words[0] == "done" and len(words) == 4 and words[1].isdigit():
                return int(words[1]), words[3]
            elif words[0] == "error":
                raise OSError(" ".join(words[1:])[:200])
    raise OSError("the disk scan took too long")


def filesystem(path: str) -> tuple[int, int, int]:
    """(total, used, free-for-users) bytes of the filesystem holding `path`."""
    fs = os.statvfs(path)
    return (
        fs.f_blocks * fs.f_frsize,
        (fs.f_blocks - fs.f_bfree) * fs.f_frsize,
        fs.f_bavail * fs.f_frsize,
    )


def claim_next(db: Database, now: datetime | None = None) -> DiskUsage | None:
    """Take the oldest requested scan (or one whose scanner died); None when there is none."""
    now = now or utcnow()
    stuck = now - timedelta(seconds=STUCK_SECONDS)
    wanted = or_(
        DiskUsage.status == PENDING,
        and_(DiskUsage.status == SCANNING, DiskUsage.started_at < stuck),
    )
    with db.session() as session:
        candidates = list(session.scalars(select(DiskUsage).where(wanted).order_by(DiskUsage.user)))
    for row in candidates:
        with db.transaction() as session:
            result = session.execute(
                update(DiskUsage)
                .where(DiskUsage.user == row.user, DiskUsage.status == row.status, wanted)
                .values(status=SCANNING, started_at=now, scanned_bytes=0, error=None)
                .execution_options(synchronize_session=False)
            )
        if result.rowcount:  # type: ignore[attr-defined]
            row.status, row.started_at, row.scanned_bytes = SCANNING, now, 0
            return row
    return None


def scan(db: Database, user: str, home: str) -> DiskUsage:
    """Measure one claimed user's home, writing progress, then the result."""

    def write(**values: Any) -> None:
        with db.transaction() as session:
            session.execute(
                update(DiskUsage)
                .where(DiskUsage.user == user, DiskUsage.status == SCANNING)
                .values(**values)
                .execution_options(synchronize_session=False)
            )

    try:
        if not home or not os.path.isdir(home):
            raise FileNotFoundError(f"home directory {home or '(none)'} does not exist")
        used, ended = measure_tree(home, lambda done: write(scanned_bytes=done), user)
        fs_total, fs_used, fs_free = filesystem(home)
    except (OSError, KeyError) as exc:
        write(status=ERROR, error=str(exc), measured_at=utcnow())
    else:
        write(
            status=DONE,
            error=None if ended == "complete" else f"stopped early: {ended}",
            used_bytes=used,
            scanned_bytes=used,
            fs_total_bytes=fs_total,
            fs_used_bytes=fs_used,
            fs_free_bytes=fs_free,
            measured_at=utcnow(),
        )
    with db.session() as session:
        result = session.get(DiskUsage, user)
    assert result is not None
    return result


def scan_pending(ctx: Context) -> int:
    """Measure every requested home, one after another. Returns how many were measured."""
    done = 0
    while (row := claim_next(ctx.db)) is not None:
        home = home_of(row.user) or row.home
        scan(ctx.db, row.user, home)
        done += 1
    return done


def _scan_quietly(ctx: Context) -> None:
    try:
        scan_pending(ctx)
    except Exception:  # the next step starts another pass
        log.exception("disk usage scan failed")


def has_pending(db: Database) -> bool:
    """Whether a scan is requested (cheap check before starting a thread)."""
    stuck = utcnow() - timedelta(seconds=STUCK_SECONDS)
    with db.session() as session:
        stmt = select(DiskUsage.user).where(
            or_(
                DiskUsage.status == PENDING,
                and_(DiskUsage.status == SCANNING, DiskUsage.started_at < stuck),
            )
        )
        return session.scalar(stmt.limit(1)) is not None


class DiskStep:
    """Agent step: start measuring requested homes in the background (its own worker), so
    a huge home never stalls the loop. Requests are looked for every 10 s (a scan takes
    longer than that; an idle agent asks the database little, SPEC §10)."""

    name = "disk"

    def __init__(self) -> None:
        self.worker = Worker("disk")

    def every(self, settings: Settings) -> float:
        return 10.0

    def run(self, view: HostView) -> bool:
        if self.worker.busy or not has_pending(view.ctx.db):
            return False
        return self.worker.start(_scan_quietly, view.ctx)
