"""Who may hold a connection to the agent's socket, and how fast they may ask.

The socket is open to every local user, so its limits are per *person*, not per uid: a
user's subordinate uids (/etc/subuid, what rootless containers run as) count as that user,
and uids with no account share one small allowance. Each person may hold a few
connections and send requests at a steady rate (a token bucket); past that they are told
to slow down, and nobody else notices (SPEC §12: no request of one user can stall the
agent's enforcement loop).
"""

from __future__ import annotations

import os
import pwd
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

SUBUID = Path("/etc/subuid")
STRANGERS = "uids without an account"


@dataclass
class _Bucket:
    """One person's request allowance: `tokens` refill at the rate, up to the burst."""

    tokens: float
    at: float


@dataclass
class Admission:
    """Connection and request limits per person; thread-safe."""

    total: int = 128  # connections open at once, everyone together
    per_person: int = 16
    strangers: int = 4  # connections of every uid without an account, together
    rate: float = 20.0  # requests a second per person, sustained
    burst: float = 40.0
    subuid: Path = SUBUID
    _open: dict[str, int] = field(default_factory=dict)
    _buckets: dict[str, _Bucket] = field(default_factory=dict)
    _ranges: list[tuple[int, int, str]] = field(default_factory=list)
    _ranges_stamp: tuple[int, int] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def person(self, uid: int) -> str:
        """Whose connection this is: the account owning `uid` (directly or as a subuid)."""
        try:
            return f"uid {pwd.getpwuid(uid).pw_uid}"
        except (KeyError, OverflowError):
            pass
        for start, count, owner in self._subuid_ranges():
            if start <= uid < start + count:
                return owner
        return STRANGERS

    def admit(self, uid: int) -> tuple[str, str | None]:
        """(person, refusal): the connection is counted unless a refusal is given."""
        person = self.person(uid)
        with self._lock:
            limit = self.strangers if person == STRANGERS else self.per_person
            if sum(self._open.values()) >= self.total:
                return person, "too many connections; try again"
            if self._open.get(person, 0) >= limit:
                return person, f"you have {limit} connections open already"
            self._open[person] = self._open.get(person, 0) + 1
        return person, None

    def leave(self, person: str) -> None:
        """A connection of `person` closed."""
        with self._lock:
            left = self._open.get(person, 0) - 1
            if left > 0:
                self._open[person] = left
            else:
                self._open.pop(person, None)

    def may_ask(self, person: str) -> bool:
        """Take one request from `person`'s allowance; False when it is spent for now."""
        now = time.monotonic()
        with self._lock:
            bucket = self._buckets.setdefault(person, _Bucket(self.burst, now))
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.at) * self.rate)
            bucket.at = now
            if bucket.tokens < 1:
                return False
            bucket.tokens -= 1
            return True

    def _subuid_ranges(self) -> list[tuple[int, int, str]]:
        """(start, count, person) of /etc/subuid, re-read when the file changes."""
        try:
            info = os.stat(self.subuid)
        except OSError:
            return []
        stamp = (info.st_mtime_ns, info.st_size)
        if stamp != self._ranges_stamp:
            self._ranges = _parse_subuid(self.subuid.read_text(errors="replace"))
            self._ranges_stamp = stamp
        return self._ranges


def _parse_subuid(text: str) -> list[tuple[int, int, str]]:
    """`name:start:count` lines (name may be a uid) as (start, count, person)."""
    ranges = []
    for line in text.splitlines():
        parts = line.strip().split(":")
        if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
            continue
        owner = parts[0]
        try:
            uid = int(owner) if owner.isdigit() else pwd.getpwnam(owner).pw_uid
        except KeyError:
            continue
        ranges.append((int(parts[1]), int(parts[2]), f"uid {uid}"))
    return ranges
