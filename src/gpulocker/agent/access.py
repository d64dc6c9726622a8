"""Who may open a GPU's device file (POSIX ACLs), and ending the processes that may not.

The baseline is fail closed: every managed `/dev/nvidiaN` gets the ACL

    user::rw-  group::---  mask::rw-  other::---  user:<uid>:rw- (one per allowed user)

so a user the app has never heard of (LDAP, created later) cannot open the GPU, and a
grant or revoke is one named entry. The whole ACL is written with one `acl_set_file`
call (pylibacl), never through a shell, so a crash can never leave half an ACL.
`/dev/nvidiactl`, `/dev/nvidia-uvm*` and GPUs that are not managed are never touched:
callers pass only managed device files.

An open file descriptor outlives an ACL, so revoking also ends processes: `Reaper`
sends SIGTERM and, after KILL_GRACE_SECONDS, SIGKILL to whatever is still alive (a
violator gets `Reaper.kill`: SIGKILL at once). It never
blocks: the agent polls it every tick.
"""

from __future__ import annotations

import logging
import os
import pwd
import signal
import stat
import threading
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import posix1e
import psutil

from gpulocker import safefs

log = logging.getLogger(__name__)

RW = "rw-"
NONE = "---"
# Entries of the baseline other than the named users: tag -> permissions.
BASELINE = {"user::": RW, "group::": NONE, "mask::": RW, "other::": NONE}


@dataclass(frozen=True)
class FileAccess:
    """A device file's owner, mode and ACL, as read (permissions as 'rw-' text)."""

    path: str
    owner_uid: int
    mode: int
    base: dict[str, str]  # "user::", "group::", "mask::", "other::" -> perms (mask may be absent)
    users: dict[int, str]  # named user entries: uid -> perms
    groups: dict[int, str]  # named group entries: gid -> perms

    @property
    def mode_text(self) -> str:
        """The permission bits as octal, e.g. '0666'."""
        return f"{stat.S_IMODE(self.mode):04o}"


def _perms(entry: posix1e.Entry) -> str:
    permset = entry.permset
    return (
        ("r" if permset.read else "-")
        + ("w" if permset.write else "-")
        + ("x" if permset.execute else "-")
    )


_BASE_TAGS = {
    posix1e.ACL_USER_OBJ: "user::",
    posix1e.ACL_GROUP_OBJ: "group::",
    posix1e.ACL_MASK: "mask::",
    posix1e.ACL_OTHER: "other::",
}


def read(path: str | Path) -> FileAccess:
    """Read the owner, mode and ACL of `path` (raises OSError when it cannot).

    Through one O_NOFOLLOW fd: a symlink put in a device file's place raises UnsafePath.
    """
    fd = safefs.open_regular(path)
    try:
        info = os.fstat(fd)
        acl = posix1e.ACL(fd=fd)
    finally:
        os.close(fd)
    base: dict[str, str] = {}
    users: dict[int, str] = {}
    groups: dict[int, str] = {}
    for entry in acl:
        tag = entry.tag_type
        if tag in _BASE_TAGS:
            base[_BASE_TAGS[tag]] = _perms(entry)
        elif tag == posix1e.ACL_USER:
            users[int(entry.qualifier)] = _perms(entry)
        elif tag == posix1e.ACL_GROUP:
            groups[int(entry.qualifier)] = _perms(entry)
    return FileAccess(str(path), info.st_uid, info.st_mode, base, users, groups)


def baseline_problems(current: FileAccess) -> list[str]:
    """What differs from the fail-closed baseline, other than named users (empty = fine)."""
    problems = []
    if current.owner_uid != 0:
        problems.append(f"owner uid {current.owner_uid} -> 0")
    for tag, wanted in BASELINE.items():
        have = current.base.get(tag)
        if have != wanted:
            problems.append(f"{tag}{have or 'missing'} -> {wanted}")
    for gid, perms in sorted(current.groups.items()):
        problems.append(f"removed group:{group_label(gid)}:{perms}")
    return problems


def compliant(current: FileAccess, uids: Collection[int]) -> bool:
    """True when the file already says exactly: baseline plus rw- for each of `uids`."""
    wanted = dict.fromkeys(uids, RW)
    return not baseline_problems(current) and current.users == wanted


def apply(path: str | Path, uids: Iterable[int]) -> None:
    """Write the baseline plus `user:<uid>:rw-` for each uid, replacing the whole ACL.

    The owner is set back to root first when it is not (a user-owned device file would let
    its owner in through `user::`).
    """
    fd = safefs.open_regular(path)  # never chown or set an ACL through a link
    try:
        if os.fstat(fd).st_uid != 0:
            os.fchown(fd, 0, -1)
        acl = posix1e.ACL()
        for tag, perms in (
            (posix1e.ACL_USER_OBJ, RW),
            (posix1e.ACL_GROUP_OBJ, NONE),
            (posix1e.ACL_OTHER, NONE),
            (posix1e.ACL_MASK, RW),
        ):
            _add(acl, tag, perms)
        for uid in sorted(set(uids)):
            _add(acl, posix1e.ACL_USER, RW, uid)
        acl.applyto(fd)
    finally:
        os.close(fd)


def _add(acl: posix1e.ACL, tag: int, perms: str, qualifier: int | None = None) -> None:
    entry = acl.append()
    entry.tag_type = tag
    if qualifier is not None:
        entry.qualifier = qualifier
    entry.permset.clear()
    if "r" in perms:
        entry.permset.add(posix1e.ACL_READ)
    if "w" in perms:
        entry.permset.add(posix1e.ACL_WRITE)


_UIDS: dict[str, int] = {}  # successful lookups only: a failure is never remembered


def user_uid(name: str) -> int | None:
    """The uid of account `name` (None when there is none; a numeric name is a uid).

    A lookup that fails now (an LDAP/SSSD hiccup) falls back to the uid last seen for that
    name, so a holder never loses access or counts as a violator because of an outage.
    """
    try:
        uid = pwd.getpwnam(name).pw_uid
    except (KeyError, OSError):
        if name in _UIDS:
            return _UIDS[name]
        return int(name) if name.isdigit() else None
    if len(_UIDS) > 65536:
        _UIDS.clear()
    _UIDS[name] = uid
    return uid


def user_label(uid: int) -> str:
    """The account name of `uid`, or the uid as text."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def group_label(gid: int) -> str:
    """The group name of `gid`, or the gid as text."""
    import grp

    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


# --- ending processes


@dataclass
class _Doomed:
    process: psutil.Process
    deadline: float
    killed: bool = False


@dataclass
class Reaper:
    """Ends processes: SIGTERM now, SIGKILL once `grace` seconds have passed.

    `terminate` returns at once; `poll` (called every agent tick) sends the SIGKILLs that
    are due and forgets processes that are gone. A pid is identified with its start time,
    so a recycled pid is never signalled.
    """

    grace: float
    pending: dict[int, _Doomed] = field(default_factory=dict)
    # The loop (violations, reap) and the watch thread (a reconcile's revoke) share it.
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    def terminate(self, pids: Iterable[int]) -> list[int]:
        """Send SIGTERM to each pid (never to this process or pid 1); returns those signalled."""
        with self._lock:
            return self._terminate(pids)

    def _terminate(self, pids: Iterable[int]) -> list[int]:
        signalled = []
        for pid in pids:
            if pid in (0, 1, os.getpid()) or pid in self.pending:
                continue
            try:
                process = psutil.Process(pid)
                process.send_signal(signal.SIGTERM)
            except (psutil.NoSuchProcess, psutil.AccessDenied) as exc:
                log.info("could not SIGTERM pid %s: %s", pid, exc)
                continue
            self.pending[pid] = _Doomed(process, time.monotonic() + self.grace)
            signalled.append(pid)
        return signalled

    def kill(self, pids: Iterable[int]) -> list[int]:
        """SIGKILL each pid now (violators get no grace); returns those signalled. They are
        tracked like the others until gone."""
        with self._lock:
            return self._kill(pids)

    def _kill(self, pids: Iterable[int]) -> list[int]:
        signalled = []
        for pid in pids:
            if pid in (0, 1, os.getpid()):
                continue
            try:
                process = self.pending[pid].process if pid in self.pending else psutil.Process(pid)
                process.send_signal(signal.SIGKILL)
            except (psutil.NoSuchProcess, psutil.AccessDenied) as exc:
                log.info("could not SIGKILL pid %s: %s", pid, exc)
                continue
            self.pending[pid] = _Doomed(process, time.monotonic(), killed=True)
            signalled.append(pid)
        return signalled

    def poll(self) -> bool:
        """SIGKILL the processes whose grace is over; drop the ones that are gone.
        True when something was signalled or found gone."""
        with self._lock:
            return self._poll()

    def _poll(self) -> bool:
        now = time.monotonic()
        worked = False
        for pid, doomed in list(self.pending.items()):
            if not alive(doomed.process):
                del self.pending[pid]
                worked = True
            elif now >= doomed.deadline and not doomed.killed:
                try:
                    doomed.process.send_signal(signal.SIGKILL)
                    log.warning("pid %s ignored SIGTERM for %.1f s: SIGKILL", pid, self.grace)
                except psutil.NoSuchProcess:
                    pass
                doomed.killed = True
                worked = True
        return worked

    def busy(self, pids: Iterable[int]) -> bool:
        """True while any of `pids` is still being ended."""
        return any(pid in self.pending for pid in pids)


def alive(process: psutil.Process) -> bool:
    """True while the process runs (a zombie waiting for its parent counts as gone)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
