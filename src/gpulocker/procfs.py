"""Which processes hold which files open, read from /proc/*/fd, with their real owners.

`holders_by_device` finds them by what they hold (device number, or filesystem and inode)
in one full sweep; `DescriptorSweep` does the same work a slice of the processes per call,
which is what the agent samples with; `holders` matches path text and remains for callers
that want exactly that."""

from __future__ import annotations

import contextlib
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

    One full sweep of /proc/<pid>/fd: each descriptor is stat()ed through its magic link
    (which reaches the open file itself, not a path) and compared with the paths' device
    numbers. `DescriptorSweep` spreads the same work over several calls.
    """
    path_list = list(paths)
    found: dict[str, list[OpenFileHolder]] = {p: [] for p in path_list}
    match = _Match(device_keys(path_list))
    if match:
        for pid in _pids():
            _collect(pid, match, found)
    return found


class _Match:
    """The managed files' keys, as the sweep compares them."""

    def __init__(self, keys: dict[DeviceKey, str]) -> None:
        self.keys = keys
        self.chars = {os.makedev(k[1], k[2]): p for k, p in keys.items() if k[0] == "c"}
        self.files = {(k[1], k[2]): p for k, p in keys.items() if k[0] == "f"}

    def __bool__(self) -> bool:
        return bool(self.keys)

    def held_by(self, pid: int) -> set[str]:
        """The managed paths process `pid` holds open (empty when gone or unreadable)."""
        fd_dir = f"/proc/{pid}/fd/"
        try:
            names = os.listdir(fd_dir)
        except OSError:  # gone, or a kernel thread
            return set()
        hit: set[str] = set()
        chars, files, stat_fd, is_chr = self.chars, self.files, os.stat, stat.S_ISCHR
        for fd in names:
            try:
                info = stat_fd(fd_dir + fd)
            except OSError:
                continue
            if is_chr(info.st_mode):
                path = chars.get(info.st_rdev)
            else:
                path = files.get((info.st_dev, info.st_ino))
            if path is not None:
                hit.add(path)
        return hit


def _pids() -> list[int]:
    """Every process on the host but this one, in pid order."""
    pids = sorted(map(int, filter(str.isdigit, os.listdir("/proc"))))
    with contextlib.suppress(ValueError):
        pids.remove(os.getpid())
    return pids


def _collect(pid: int, match: _Match, found: dict[str, list[OpenFileHolder]]) -> bool:
    """Add `pid` to `found` under each managed path it holds; True when it holds one."""
    hit = match.held_by(pid)
    if not hit:
        return False
    uid = process_owner(pid)
    if uid is None:
        return False
    holder = OpenFileHolder(pid, uid, user_name(uid), process_name(pid))
    for path in hit:
        found[path].append(holder)
    return True


SWEEP_ROUND_SECONDS = 10.0  # a round of the sweep spans at least this (SPEC 13 bound)
PIDS_PER_SAMPLE = 500  # a host with more processes gets more slices per round


class DescriptorSweep:
    """`holders_by_device` spread over the samples: each call looks at

    - every process that is new since the previous call (up to one slice of them),
    - every process that held a managed file at its last look,
    - one slice of the others: those whose pid modulo `slices` is this call's number,

    so a round of `slices` calls looks at every process, and a process that holds a managed
    file is found within one round (the next call when it is new). `slices` is fixed for a
    round and chosen at its start: at least `min_slices`, more when the host has more than
    `per_sample` processes per slice. The first call (and the first after the managed files
    changed) looks at every process.
    """

    def __init__(self, min_slices: int = 1, per_sample: int = PIDS_PER_SAMPLE) -> None:
        self.min_slices = max(1, min_slices)
        self.per_sample = max(1, per_sample)
        self.slices = 1
        self.looked = 0  # processes the last call looked at
        self.rounds = 0  # rounds completed
        self._slice = 0
        self._keys: dict[DeviceKey, str] | None = None
        self._listed: set[int] | None = None
        self._held: set[int] = set()

    def sweep(self, paths: Iterable[str]) -> dict[str, list[OpenFileHolder]]:
        """The holders of each path seen by this call (see the class)."""
        path_list = list(paths)
        found: dict[str, list[OpenFileHolder]] = {p: [] for p in path_list}
        keys = device_keys(path_list)
        if keys != self._keys:  # first call, or a file re-created: look at everything
            self._keys, self._listed, self._held, self._slice = keys, None, set(), 0
        match = _Match(keys)
        if not match:
            return found
        pids = _pids()
        listed = set(pids)
        look = self._choose(pids, listed)
        self._listed = listed
        self._held = {pid for pid in look if _collect(pid, match, found)}
        self.looked = len(look)
        return found

    def _choose(self, pids: list[int], listed: set[int]) -> list[int]:
        before = self._listed
        if before is None:
            self.rounds += 1
            return pids
        if self._slice == 0:  # a new round
            self.slices = max(self.min_slices, -(-len(pids) // self.per_sample))
        share = -(-len(pids) // self.slices)
        part, slices = self._slice, self.slices
        look = {pid for pid in pids if pid % slices == part}
        look.update([pid for pid in pids if pid not in before][:share])
        look.update(self._held & listed)
        self._slice = (part + 1) % slices
        if self._slice == 0:
            self.rounds += 1
        return sorted(look)


def process_exe_name(pid: int) -> str:
    """The file name of the program a process runs (/proc/<pid>/exe), '' when unreadable.
    Unlike `comm`, a process cannot rename it."""
    try:
        return os.path.basename(os.readlink(f"/proc/{pid}/exe")).removesuffix(" (deleted)")
    except OSError:
        return ""
