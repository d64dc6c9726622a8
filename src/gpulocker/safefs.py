"""Opening files as root without following a link nobody expected (SPEC §12).

Root acts on what it opened, never on a path twice: a file is opened once with O_NOFOLLOW
(so a symlink planted in its place is refused, not followed), checked through the open fd
(type, owner, mode) and then changed through that fd (fchown, fchmod, ACL by fd).
A folder root creates files in must not be writable by anyone but root.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


class UnsafePath(OSError):
    """A path root refuses to use: a symlink, the wrong type, or the wrong owner/mode."""


def _why_writable(info: os.stat_result) -> str | None:
    me = os.geteuid()
    if info.st_uid not in (0, me):
        return f"owned by uid {info.st_uid}, not root" + ("" if me == 0 else " or you")
    if info.st_mode & 0o022:
        return f"writable by group or others (mode {stat.S_IMODE(info.st_mode):04o})"
    return None


def check_root_dir(path: str | Path, what: str = "folder") -> None:
    """Refuse a folder that is a symlink, or that someone but root (or the caller) may write."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(info.st_mode):
        raise UnsafePath(f"{what} {path}: is a symlink; refusing to follow it as root")
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafePath(f"{what} {path}: is not a folder")
    why = _why_writable(info)
    if why:
        raise UnsafePath(f"{what} {path}: {why}; a user could swap files in it")


def make_root_dir(path: str | Path, mode: int = 0o755, what: str = "folder") -> None:
    """Create `path` (and parents) owned by root with `mode`, or check the existing one."""
    path = Path(path)
    if not os.path.lexists(path):
        path.mkdir(parents=True, mode=mode, exist_ok=True)
        os.chmod(path, mode)  # the umask must not narrow it; a fresh folder we made
    check_root_dir(path, what)


def open_nofollow(path: str | Path, flags: int = os.O_RDONLY, mode: int = 0o600) -> int:
    """os.open with O_NOFOLLOW|O_NONBLOCK|O_CLOEXEC; a symlink raises UnsafePath."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == 40 or (os.path.islink(path)):  # ELOOP: the last part is a symlink
            raise UnsafePath(f"{path}: is a symlink; refusing to follow it as root") from None
        raise


def open_regular(path: str | Path, flags: int = os.O_RDONLY) -> int:
    """Open an existing file that must be a regular file (not a link, fifo, device)."""
    fd = open_nofollow(path, flags)
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) and not stat.S_ISCHR(info.st_mode):
        os.close(fd)
        raise UnsafePath(f"{path}: not a regular file or a character device")
    return fd


def trusted_file_problem(info: os.stat_result, uid: int) -> str | None:
    """Why a file is not trusted as configuration by `uid` (None when it is)."""
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    if info.st_uid not in (0, uid):
        return f"owned by uid {info.st_uid}, neither root nor you (uid {uid})"
    if info.st_mode & 0o022:
        return f"writable by group or others (mode {stat.S_IMODE(info.st_mode):04o})"
    return None


def make_private(path: str | Path, folder: bool = False, shared: bool = False) -> None:
    """Take other users' (and, unless `shared`, the group's) access away from a state file
    or folder of ours: the database holds Telegram link codes and NOTIFY_URLS credentials.
    `shared` is a state folder made setgid for the web's own group (install, or `serve` as
    root running its web half unprivileged): the group keeps its access there. A file
    owned by another user is refused, not fixed: someone put it there; one of root's seen
    by the unprivileged web half is left as root made it, and so is one the web half made
    in a shared folder (in the folder's group: SQLite's WAL and SHM belong to whichever
    process opened the database first; only root and that group can write there)."""
    try:
        fd = open_nofollow(path, os.O_RDONLY | (os.O_DIRECTORY if folder else 0))
    except FileNotFoundError:
        return
    try:
        info = os.fstat(fd)
        ours = info.st_uid in (0, os.geteuid())
        if not ours and not (shared and not folder and _in_folder_group(path, info)):
            raise UnsafePath(f"{path}: owned by uid {info.st_uid}, not by GPULocker's user")
        mode = stat.S_IMODE(info.st_mode)
        keep = (0o2770 if folder else 0o660) if shared else (0o750 if folder else 0o600)
        wanted = mode & keep
        if wanted != mode and info.st_uid == os.geteuid():
            os.fchmod(fd, wanted)
    finally:
        os.close(fd)


def _in_folder_group(path: str | Path, info: os.stat_result) -> bool:
    """True when the file's group is its (setgid, shared) folder's."""
    return info.st_gid == os.lstat(Path(path).parent).st_gid


def private_state(folder: str | Path, files: tuple[str, ...] = ()) -> None:
    """Create or fix the state folder (0700) and the named files in it (0600)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    shared = bool(os.lstat(folder).st_mode & stat.S_ISGID)
    make_private(folder, folder=True, shared=shared)
    for name in files:
        make_private(folder / name, shared=shared)
