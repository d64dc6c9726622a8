"""A per-process cache of the `/api/gpu_status` answer, kept while nothing changed.

The status page polls this endpoint every couple of seconds from every open browser, so
it is the hottest path of the web side. Building it means reading the live samples, the
inventory and the holders; checking whether any of that changed is one tiny query: the
newest event id (every allocation, maintenance and inventory change records an event)
and the newest live sample time (or, with Redis, a digest of the live hash). While both
are unchanged the answer already serialized is sent again. `MAX_AGE_SECONDS` bounds what
could change without an event (a sample's wall-clock `at`, nothing a user acts on).

Even that query is made at most every `RECHECK_SECONDS`: changes made through this
server (any successful POST/PUT/PATCH/DELETE) bump a counter shared by all its workers,
which is part of the cache key, so they show at once; changes made by other processes
(the agent expiring an allocation, a new sample) show within `RECHECK_SECONDS`.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import threading
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select

from gpulocker import gpustatus, live
from gpulocker.context import Context
from gpulocker.models import Event, LiveStatus

MAX_AGE_SECONDS = 5.0
RECHECK_SECONDS = 0.5
STATUS_CACHE = "gpulocker.status_cache"  # its key in app.extensions
CHANGES = "gpulocker.changes"  # the ChangeCounter's key in app.extensions

_VERSION_DB = select(
    select(func.max(Event.id)).scalar_subquery(),
    select(func.max(LiveStatus.at)).scalar_subquery(),
)
_VERSION_EVENTS = select(func.max(Event.id))


@dataclass(frozen=True)
class Entry:
    """One serialized answer and the version of the data it was built from."""

    version: tuple[Any, ...]
    made: float
    body: bytes


class ChangeCounter:
    """A counter in memory shared by the workers of one server (made before they fork)."""

    def __init__(self) -> None:
        self._value = multiprocessing.RawValue("Q", 0)
        self._lock = multiprocessing.Lock()

    def bump(self) -> None:
        """Something changed through this server."""
        with self._lock:
            self._value.value += 1

    @property
    def value(self) -> int:
        """The current count (an aligned 8-byte read needs no lock)."""
        return int(self._value.value)


class StatusCache:
    """The last answer for signed-in callers and for anonymous ones (no user names)."""

    def __init__(
        self,
        changes: ChangeCounter,
        max_age: float = MAX_AGE_SECONDS,
        recheck: float = RECHECK_SECONDS,
    ) -> None:
        self.max_age = max_age
        self.recheck = recheck
        self.changes = changes
        self._entries: dict[bool, Entry] = {}
        self._lock = threading.Lock()
        self._db_version: tuple[Any, ...] = ()
        self._checked = -1e9

    def current_version(self, ctx: Context) -> tuple[Any, ...]:
        """This server's change count and the database's version (re-read when due)."""
        now = time.monotonic()
        if now - self._checked >= self.recheck:
            self._db_version = version(ctx)
            self._checked = now
        return (self.changes.value, *self._db_version)

    def body(self, ctx: Context, with_users: bool) -> bytes:
        """The JSON answer, rebuilt only when the data changed (or it got old)."""
        current = self.current_version(ctx)
        now = time.monotonic()
        entry = self._entries.get(with_users)
        if entry is not None and entry.version == current and now - entry.made < self.max_age:
            return entry.body
        with self._lock:  # one rebuild at a time per process; the others reuse it
            entry = self._entries.get(with_users)
            if entry is not None and entry.version == current and now - entry.made < self.max_age:
                return entry.body
            data = gpustatus.snapshot(ctx, with_users=with_users)
            body = json.dumps(data, separators=(",", ":"), sort_keys=True).encode() + b"\n"
            self._entries[with_users] = Entry(current, time.monotonic(), body)
            return body


def version(ctx: Context) -> tuple[Any, ...]:
    """What changes whenever the status does: newest event id and newest live sample."""
    with ctx.db.engine.connect() as conn:
        if ctx.redis is None:
            return tuple(conn.execute(_VERSION_DB).one())
        newest_event = conn.execute(_VERSION_EVENTS).scalar()
    raw = ctx.redis.hgetall(live.REDIS_KEY)
    digest = hashlib.blake2b(digest_size=16)
    for key in sorted(raw):
        digest.update(key + b"=" + raw[key] + b";")
    return (newest_event, digest.hexdigest())
