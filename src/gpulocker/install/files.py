"""Actions install and uninstall take: write a file, remove one, run a command. Writing follows
no link: every directory on the way is opened with O_NOFOLLOW|O_DIRECTORY, the file is written
to a fresh temporary name (O_EXCL) beside it and renamed over it."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

Echo = Callable[[str], None]


@dataclass(frozen=True)
class WriteFile:
    path: str  # absolute, as on the installed system
    content: bytes
    mode: int = 0o644
    group: str | None = None  # chown root:group (not under --root unless the group exists)
    keep_existing: bool = False

    def describe(self) -> str:
        keep = " (kept if it exists)" if self.keep_existing else ""
        owner = f" root:{self.group}" if self.group else ""
        return f"write {self.path} mode {self.mode:04o}{owner}{keep}"


@dataclass(frozen=True)
class MakeDir:
    path: str
    mode: int = 0o755
    group: str | None = None

    def describe(self) -> str:
        owner = f" root:{self.group}" if self.group else ""
        return f"mkdir {self.path} mode {self.mode:04o}{owner}"


@dataclass(frozen=True)
class RemoveFile:
    path: str

    def describe(self) -> str:
        return f"remove {self.path}"


@dataclass(frozen=True)
class Run:
    argv: tuple[str, ...]
    only_live: bool = True  # skipped under --root (systemctl, useradd act on the real system)

    def describe(self) -> str:
        return "run " + " ".join(self.argv)


Action = WriteFile | MakeDir | RemoveFile | Run


def _open_dir(root: Path, rel: PurePosixPath, create_mode: int | None) -> int:
    """An fd on root/rel, walking each component without following links; creating the missing
    ones with create_mode (None: do not create)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    last = len(rel.parts) - 1
    try:
        for i, part in enumerate(rel.parts):
            try:
                new = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                if create_mode is None:
                    raise
                os.mkdir(part, create_mode if i == last else 0o755, dir_fd=fd)
                new = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = new
    except BaseException:
        os.close(fd)
        raise
    return fd


def _gid(group: str | None) -> int:
    import grp

    if group is None:
        return -1
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        return -1


def _rel(path: str) -> PurePosixPath:
    return PurePosixPath(path).relative_to("/")


def write_file(root: Path, action: WriteFile) -> bool:
    """Write action under root; False when kept (keep_existing and the file is there)."""
    rel = _rel(action.path)
    dfd = _open_dir(root, rel.parent, 0o755)  # parents the package manager did not make
    try:
        if action.keep_existing:
            try:
                os.stat(rel.name, dir_fd=dfd, follow_symlinks=False)
                return False
            except FileNotFoundError:
                pass
        tmp = f".{rel.name}.gpulocker-new"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dfd)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
        fd = os.open(tmp, flags, 0o600, dir_fd=dfd)
        try:
            os.write(fd, action.content)
            if os.geteuid() == 0:
                os.fchown(fd, -1, _gid(action.group))
            os.fchmod(fd, action.mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, rel.name, src_dir_fd=dfd, dst_dir_fd=dfd)
        return True
    finally:
        os.close(dfd)


def make_dir(root: Path, action: MakeDir) -> None:
    fd = _open_dir(root, _rel(action.path), action.mode)
    try:
        if os.geteuid() == 0:
            os.fchown(fd, -1, _gid(action.group))
        os.fchmod(fd, action.mode)
    finally:
        os.close(fd)


def remove_file(root: Path, action: RemoveFile) -> bool:
    rel = _rel(action.path)
    try:
        dfd = _open_dir(root, rel.parent, None)
    except (FileNotFoundError, NotADirectoryError):
        return False
    try:
        os.unlink(rel.name, dir_fd=dfd)
        return True
    except FileNotFoundError:
        return False
    finally:
        os.close(dfd)


def apply(actions: list[Action], root: Path, dry_run: bool, echo: Echo) -> int:
    """Carry out (or, dry_run, only print) each action; the number of failed commands."""
    live = root == Path("/")
    failures = 0
    for action in actions:
        if dry_run:
            echo(f"would {action.describe()}")
            continue
        if isinstance(action, WriteFile):
            echo(action.describe() if write_file(root, action) else f"keep {action.path}")
        elif isinstance(action, MakeDir):
            make_dir(root, action)
            echo(action.describe())
        elif isinstance(action, RemoveFile):
            if remove_file(root, action):
                echo(action.describe())
        elif action.only_live and not live:
            echo(f"skip (--root) {action.describe()}")
        else:
            echo(action.describe())
            done = subprocess.run(list(action.argv), check=False)
            if done.returncode != 0:
                echo(f"  failed with status {done.returncode}")
                failures += 1
    return failures


def exists(root: Path, path: str) -> bool:
    return os.path.lexists(root / _rel(path))
