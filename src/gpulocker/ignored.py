"""IGNORED_PROCESSES: system processes that hold GPUs without being anyone's work.

Display servers, persistence and monitoring daemons keep a GPU open. They are never
violators and never count as a holder's activity. A rule names the user and the command:

- `user:command` -- that account running that program (e.g. `gdm:gnome-shell`);
- `command` -- that program run by root or any system account (uid below UID_MIN of
  /etc/login.defs, 1000 when it says nothing).

The command matches the file name of the program (/proc/<pid>/exe) or the process name
(comm). Both can be chosen by whoever starts the process (copy a binary, `prctl`), so the
user half is what makes a rule safe: a student who names their own program `Xorg` runs it
as a regular uid, which a bare `Xorg` rule never matches.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from gpulocker import procfs

DEFAULT = (
    "Xorg",
    "Xwayland",
    "gnome-shell",
    "nvidia-persistenced",
    "nv-hostengine",
    "dcgm-exporter",
)
_NAME = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.@+-]*$")
LOGIN_DEFS = Path("/etc/login.defs")


@dataclass(frozen=True)
class Rule:
    """One IGNORED_PROCESSES entry; `user` None means root or any system account."""

    user: str | None
    command: str


def parse(entries: tuple[str, ...] | list[str]) -> tuple[Rule, ...]:
    """The rules of `entries`; ValueError naming the first bad one."""
    rules = []
    for entry in entries:
        user, sep, command = entry.rpartition(":")
        if not _NAME.match(command) or (sep and not _NAME.match(user)):
            raise ValueError(
                f"`command` or `user:command` per entry, e.g. Xorg or gdm:gnome-shell (got {entry!r})"
            )
        rules.append(Rule(user if sep else None, command))
    return tuple(rules)


def setting(raw: str) -> tuple[str, ...]:
    """IGNORED_PROCESSES as configured (comma-separated); ValueError for a bad entry."""
    entries = tuple(part.strip() for part in raw.split(",") if part.strip())
    parse(entries)
    return entries


@lru_cache(maxsize=1)
def uid_min(path: Path = LOGIN_DEFS) -> int:
    """The first uid of a regular account (UID_MIN in /etc/login.defs, else 1000)."""
    try:
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] == "UID_MIN" and parts[1].isdigit():
                return int(parts[1])
    except OSError:
        pass
    return 1000


def system_account(uid: int | None) -> bool:
    """Root or a system account (nobody, 65534, counts as system too)."""
    return uid is not None and (uid < uid_min() or uid == 65534)


def matches(rules: tuple[Rule, ...], pid: int, uid: int | None, user: str, name: str = "") -> bool:
    """True when process `pid` (owner `uid`/`user`, reported `name`) is one `rules` ignores."""
    if not rules or uid is None:
        return False
    commands = {name, procfs.process_exe_name(pid), procfs.process_name(pid)} - {""}
    for rule in rules:
        if rule.command not in commands:
            continue
        if rule.user is None and system_account(uid):
            return True
        if rule.user is not None and rule.user == user:
            return True
    return False
