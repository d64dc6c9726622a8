"""Which processes hold which files open, read from /proc/*/fd, with their real owners."""

from __future__ import annotations

import os
import pwd
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class OpenFileHolder:
    """A process that has a file open."""

    pid: int
    uid: int | None
    user: str
    name: str


_NAMES: dict[int, str] = {}  # successful lookups only: a failure is never remembered


def known_name(uid: int) -> str | None:
    """The account name of `uid` looked up now, or None when the lookup fails (no passwd
    entry, or NSS/LDAP/SSSD answering nothing right now). Only successes are cached, so a
    hiccup costs one retry, not a wrong answer until a restart (SPEC §12)."""
    try:
        name = pwd.getpwuid(uid).pw_name
    except (KeyError, OSError):
        return None
    if len(_NAMES) > 65536:
        _NAMES.clear()
    _NAMES[uid] = name
    return name


def user_name(uid: int) -> str:
    """The account name of `uid` for display: a fresh lookup, else the last name seen for
    that uid, else the uid as text. Decisions use the uid, never this text."""
    return known_name(uid) or _NAMES.get(uid) or str(uid)


def process_owner(pid: int) -> int | None:
    """The real uid of a process (`Uid:` in /proc/<pid>/status); None if it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def process_name(pid: int) -> str:
    """The short command name of a process ('' if it is gone)."""
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def holders(paths: Iterable[str]) -> dict[str, list[OpenFileHolder]]:
    """For each path, the processes with it open. One pass over /proc for all paths."""
    wanted = {os.path.realpath(p): p for p in paths}
    found: dict[str, list[OpenFileHolder]] = {p: [] for p in wanted.values()}
    if not wanted:
        return found
    with os.scandir("/proc") as entries:
        pids = [int(e.name) for e in entries if e.name.isdigit()]
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            names = os.listdir(fd_dir)
        except OSError:  # gone, or a kernel thread we may not read
            continue
        hit: set[str] = set()
        for fd in names:
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if target in wanted:
                hit.add(wanted[target])
        if not hit:
            continue
        uid = process_owner(pid)
        if uid is None:
            continue
        holder = OpenFileHolder(pid, uid, user_name(uid), process_name(pid))
        for path in hit:
            found[path].append(holder)
    return found
