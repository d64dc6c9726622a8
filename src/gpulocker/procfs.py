"""Which processes hold which files open, read from /proc/*/fd, with their real owners.

`holders_by_device` finds them by what they hold (device number, or filesystem and inode),
which is what the agent uses; `holders` matches path text and remains for callers that
want exactly that."""

from __future__ import annotations

import os
import pwd
import stat
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


# --- holders found by what they hold

DeviceKey = tuple[str, int, int]


def device_key(info: os.stat_result) -> DeviceKey:
    """What a file *is*, whatever path names it: a character device by its device number,
    anything else (the simulated GPUs' regular files) by its filesystem and inode."""
    if stat.S_ISCHR(info.st_mode):
        return ("c", os.major(info.st_rdev), os.minor(info.st_rdev))
    return ("f", info.st_dev, info.st_ino)


def device_keys(paths: Iterable[str]) -> dict[DeviceKey, str]:
    """Key -> path for each path that exists (a missing device file holds nobody)."""
    keys = {}
    for path in paths:
        try:
            keys[device_key(os.stat(path))] = path
        except OSError:
            continue
    return keys


def holders_by_device(paths: Iterable[str]) -> dict[str, list[OpenFileHolder]]:
    """For each path, the processes holding an open descriptor to the same file, however
    they opened it (another path, a hard link, a bind mount, a descriptor passed on).

    One sweep of /proc/<pid>/fd: each descriptor is stat()ed through its magic link (which
    reaches the open file itself, not a path) and compared with the paths' device numbers.
    """
    path_list = list(paths)
    found: dict[str, list[OpenFileHolder]] = {p: [] for p in path_list}
    wanted = device_keys(path_list)
    if not wanted:
        return found
    chars = {(k[1], k[2]): p for k, p in wanted.items() if k[0] == "c"}
    files = {(k[1], k[2]): p for k, p in wanted.items() if k[0] == "f"}
    stat_fd = os.stat
    is_chr = stat.S_ISCHR
    with os.scandir("/proc") as entries:
        pids = [int(e.name) for e in entries if e.name.isdigit()]
    me = os.getpid()
    for pid in pids:
        if pid == me:
            continue
        fd_dir = f"/proc/{pid}/fd/"
        try:
            names = os.listdir(fd_dir)
        except OSError:  # gone, or a kernel thread
            continue
        hit: set[str] = set()
        for fd in names:
            try:
                info = stat_fd(fd_dir + fd)
            except OSError:
                continue
            if is_chr(info.st_mode):
                path = chars.get((os.major(info.st_rdev), os.minor(info.st_rdev)))
            else:
                path = files.get((info.st_dev, info.st_ino))
            if path is not None:
                hit.add(path)
        if not hit:
            continue
        uid = process_owner(pid)
        if uid is None:
            continue
        holder = OpenFileHolder(pid, uid, user_name(uid), process_name(pid))
        for path in hit:
            found[path].append(holder)
    return found


def process_exe_name(pid: int) -> str:
    """The file name of the program a process runs (/proc/<pid>/exe), '' when unreadable.
    Unlike `comm`, a process cannot rename it."""
    try:
        return os.path.basename(os.readlink(f"/proc/{pid}/exe")).removesuffix(" (deleted)")
    except OSError:
        return ""
