"""Hearing a device file change at once: inotify on the managed files and their folders.

`nvidia-modprobe` (setuid root) puts a device file back to the driver's DeviceFileMode
whenever it differs, and anyone can make it run; a 0.2 s stat poll leaves a window to open
the GPU. A thread of the agent blocks on an inotify descriptor instead: an attribute change
on a file (chmod, chown, setfacl) or a file created, moved or deleted in its folder (a
re-created `/dev/nvidiaN`) wakes it and it restores the file at once from the plan the
last reconcile applied (`Agent.restore`: no database read, only the reconciler's short
files lock, so it never waits behind a revoke or a slow database; agent/reconcile.py says
why that plan is never more open than the file should be). The periodic reconcile
re-reads the database and stays as the backstop; when inotify is not available
(`open_watch` returns None) polling is all.

libc's inotify_init1 and inotify_add_watch through ctypes: no package, no polling. Files are watched with IN_DONT_FOLLOW: a symlink put where a device file was is
watched as itself, never followed.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import select
import struct
import threading
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

IN_ATTRIB = 0x00000004
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

FILE_MASK = IN_ATTRIB | IN_DELETE_SELF | IN_MOVE_SELF | IN_DONT_FOLLOW
DIR_MASK = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_ONLYDIR | IN_DONT_FOLLOW
_HEADER = struct.Struct("iIII")
WAKE_SECONDS = 60.0  # the blocked thread's longest sleep (a stop pokes it at once)


class DeviceWatch:
    """An inotify descriptor watching `paths` and their folders. `wait` returns the paths
    that changed (empty when the timeout passed); `heard` counts them."""

    def __init__(self, paths: list[str]) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.fd = fd
        self._poke_r, self._poke_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.paths = list(paths)
        self.heard = 0
        self._files: dict[int, str] = {}  # watch descriptor -> managed path
        self._dirs: dict[int, dict[str, str]] = {}  # wd -> file name -> managed path
        for folder in sorted({str(Path(p).parent) for p in self.paths}):
            names = {Path(p).name: p for p in self.paths if str(Path(p).parent) == folder}
            wd = self._add(folder, DIR_MASK)
            if wd is not None:
                self._dirs[wd] = names
        for path in self.paths:
            self._watch_file(path)

    def _add(self, path: str, mask: int) -> int | None:
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(path), mask)
        if wd < 0:
            code = ctypes.get_errno()
            if code != errno.ENOENT:
                log.warning("cannot watch %s: %s", path, os.strerror(code))
            return None
        return int(wd)

    def _watch_file(self, path: str) -> None:
        wd = self._add(path, FILE_MASK)
        if wd is not None:
            self._files[wd] = path

    def wait(self, timeout: float) -> set[str]:
        """Block up to `timeout` seconds for a change; the managed paths that changed."""
        ready, _, _ = select.select([self.fd, self._poke_r], [], [], max(timeout, 0.0))
        if self._poke_r in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(self._poke_r, 64)
        if self.fd not in ready:
            return set()
        changed = self._read()
        self.heard += len(changed)
        return changed

    def _read(self) -> set[str]:
        changed: set[str] = set()
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return changed
        offset = 0
        while offset + _HEADER.size <= len(data):
            wd, mask, _cookie, length = _HEADER.unpack_from(data, offset)
            raw = data[offset + _HEADER.size : offset + _HEADER.size + length]
            offset += _HEADER.size + length
            if mask & IN_Q_OVERFLOW:  # lost events: treat everything as changed
                changed.update(self.paths)
            elif wd in self._files:
                changed.add(self._files[wd])
                if mask & (IN_IGNORED | IN_DELETE_SELF | IN_MOVE_SELF):
                    self._files.pop(wd, None)
            elif wd in self._dirs:
                path = self._dirs[wd].get(os.fsdecode(raw.rstrip(b"\0")))
                if path is not None:
                    changed.add(path)
                    if mask & (IN_CREATE | IN_MOVED_TO):
                        self._watch_file(path)  # the new inode
        return changed

    def poke(self) -> None:
        """Make a `wait` in progress return at once (to stop)."""
        if self._poke_w >= 0:
            with contextlib.suppress(BlockingIOError):
                os.write(self._poke_w, b"x")

    def close(self) -> None:
        """Stop watching (closing the descriptor drops every watch)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            for end in (self._poke_r, self._poke_w):
                os.close(end)
            self._poke_r = self._poke_w = -1


def open_watch(paths: list[str]) -> DeviceWatch | None:
    """A watch on `paths`, or None (polling only) when inotify cannot be used here."""
    try:
        return DeviceWatch(paths)
    except (OSError, AttributeError) as exc:
        log.warning("inotify unavailable (%s); device files are checked by polling only", exc)
        return None


class Restorable(Protocol):
    """What `restore` needs of the agent (no import of the loop: no cycle)."""

    @property
    def devices(self) -> dict[int, str]: ...

    def restore(self, paths: set[str]) -> bool: ...


def restore(agent: Restorable, changed: set[str]) -> bool:
    """A watched device file changed: put it back now, from the plan the agent last
    applied (no database read; the periodic reconcile re-reads). True when corrected."""
    log.info("device file(s) changed: %s; restoring", ", ".join(sorted(changed)))
    return agent.restore(changed)


def start_thread(agent: Restorable, stop: threading.Event) -> threading.Thread | None:
    """A daemon thread blocked on the watch (no CPU while nothing changes) that reconciles
    as soon as a device file changes, until `stop` is set; None without inotify. A thread,
    not a step of the loop: a sample step can take seconds on a host with many processes
    (the descriptor sweep), and a reset device file must not wait for it."""
    devices = open_watch(list(agent.devices.values()))
    if devices is None:
        return None

    lock = threading.Lock()  # the poke never writes to a closed (reused) descriptor

    def poke_on_stop() -> None:
        stop.wait()
        with lock:
            devices.poke()

    def loop() -> None:
        try:
            while not stop.is_set():
                changed = devices.wait(WAKE_SECONDS)
                if not changed:
                    continue
                try:
                    restore(agent, changed)
                except Exception:
                    log.exception("restoring %s failed; the periodic reconcile retries", changed)
        finally:
            with lock:
                devices.close()

    threading.Thread(target=poke_on_stop, daemon=True).start()
    thread = threading.Thread(target=loop, name="gpulocker-watch", daemon=True)
    thread.start()
    return thread
