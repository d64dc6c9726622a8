"""The disk scanner: run as the user whose home it measures, bounded, following no link.

`disk` starts it as a child process that has dropped to the user's uid, gid and groups
(SPEC §12: disk usage is measured with the user's own rights), so a symlink swapped into a
home between two looks leads nowhere the user could not read anyway. It walks by open
directory descriptors (O_NOFOLLOW, relative to the parent's descriptor), never by path,
and stops at MAX_ENTRIES entries, MAX_SECONDS and MAX_DEPTH levels, with its memory capped.
It speaks on stdout, one line at a time: `progress BYTES`, then `done BYTES ENTRIES WHY`
(WHY is `complete`, or what bound stopped it). Only the standard library: it starts fast.
"""

from __future__ import annotations

import os
import resource
import stat
import sys
import time

MAX_ENTRIES = 5_000_000
MAX_SECONDS = 900.0
MAX_DEPTH = 200
MAX_MEMORY = 512 * 1024 * 1024
MAX_SEEN_LINKS = 200_000  # hard-linked files remembered to count once
PROGRESS_SECONDS = 1.0
DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def walk(
    root: str,
    max_entries: int = MAX_ENTRIES,
    max_seconds: float = MAX_SECONDS,
    progress_seconds: float = PROGRESS_SECONDS,
) -> tuple[int, int, str]:
    """(bytes, entries, why it stopped) for the tree at `root` (like `du -sx`)."""
    deadline = time.monotonic() + max_seconds
    next_report = time.monotonic() + progress_seconds
    top_fd = os.open(root, DIRECTORY)
    top = os.fstat(top_fd)
    total, entries, why = top.st_blocks * 512, 0, "complete"
    seen: set[tuple[int, int]] = set()
    stack: list[tuple[int, list[str]]] = [(top_fd, _children(top_fd))]
    try:
        while stack:
            fd, pending = stack[-1]
            if not pending:
                os.close(fd)
                stack.pop()
                continue
            name = pending.pop()
            try:
                info = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except OSError:
                continue
            entries += 1
            if info.st_nlink > 1 and not stat.S_ISDIR(info.st_mode):
                key = (info.st_dev, info.st_ino)
                if key in seen:
                    continue
                if len(seen) < MAX_SEEN_LINKS:
                    seen.add(key)
            total += info.st_blocks * 512
            if stat.S_ISDIR(info.st_mode) and info.st_dev == top.st_dev:
                if len(stack) >= MAX_DEPTH:
                    why = f"deeper than {MAX_DEPTH} levels (partial)"
                else:
                    _descend(stack, fd, name, info)
            if entries >= max_entries:
                why = f"more than {max_entries} entries (partial)"
                break
            if time.monotonic() >= next_report:
                if time.monotonic() >= deadline:
                    why = f"longer than {max_seconds:g} s (partial)"
                    break
                print(f"progress {total}", flush=True)
                next_report = time.monotonic() + progress_seconds
    finally:
        for fd, _pending in stack:
            os.close(fd)
    return total, entries, why


def _descend(
    stack: list[tuple[int, list[str]]], parent: int, name: str, seen: os.stat_result
) -> None:
    """Open the subdirectory `name` of `parent` (no link followed) and push it, if it is
    still the directory just looked at (a swap in between is skipped)."""
    try:
        child = os.open(name, DIRECTORY, dir_fd=parent)
    except OSError:
        return
    now = os.fstat(child)
    if (now.st_dev, now.st_ino) != (seen.st_dev, seen.st_ino):
        os.close(child)
        return
    try:
        stack.append((child, _children(child)))
    except OSError:
        os.close(child)


def _children(fd: int) -> list[str]:
    """The names in the directory open at `fd`."""
    with os.scandir(fd) as listing:
        return [entry.name for entry in listing]


def main(argv: list[str]) -> int:
    """`python -m gpulocker.diskscan ROOT [MAX_ENTRIES MAX_SECONDS PROGRESS_SECONDS]`."""
    resource.setrlimit(resource.RLIMIT_AS, (MAX_MEMORY, MAX_MEMORY))
    root = argv[0]
    numbers = [float(a) for a in argv[1:4]]
    limits = dict(zip(("max_entries", "max_seconds", "progress_seconds"), numbers, strict=False))
    if "max_entries" in limits:
        limits["max_entries"] = int(limits["max_entries"])
    try:
        total, entries, why = walk(root, **limits)  # type: ignore[arg-type]
    except OSError as exc:
        print(f"error {exc.strerror or exc}", flush=True)
        return 1
    except MemoryError:
        print("error the scan needed more memory than it may use", flush=True)
        return 1
    print(f"done {total} {entries} {why}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
