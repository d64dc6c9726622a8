"""What wakes the agent between its periodic steps (SPEC §10): a change, at once.

- PostgreSQL: a connection that LISTENs on `changes.CHANNEL`; every committed change
  notifies it (`gpulocker.changes`), from any host.
- SQLite: inotify on the database's write-ahead log (every writer shares this host), so a
  commit by the web server, the local socket or a CLI command wakes the agent.
- Device files are not watched here: `agent/watch.py` restores them from its own thread,
  without waiting for the loop.

`wait(timeout)` blocks in one `select` on all of these (and a pipe `wake()` writes to,
used to stop and by the watch thread), so an idle agent sleeps. The agent waits in its
own thread (`start_thread`), which reads the `ChangeToken` when woken and reconciles if
the database moved; the loop's slower steps never delay it. Whatever fails here only
costs latency: the loop still runs its change check and reconcile on their periods.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import selectors
import struct
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from gpulocker.changes import CHANNEL
from gpulocker.models import Event, OutboxMessage

log = logging.getLogger(__name__)

IN_MODIFY = 0x002
IN_CLOSE_WRITE = 0x008
IN_CREATE = 0x100
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
_EVENT = struct.Struct("iIII")
RECONNECT_SECONDS = 5.0


class _Inotify:
    """The few inotify calls the agent needs (no dependency beyond libc)."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self.fd = fd

    def add(self, path: str, mask: int) -> int:
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(path), mask)
        if wd < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {path}")
        return int(wd)

    def drain(self) -> list[tuple[int, int, str]]:
        """(watch, mask, name) of every pending event."""
        found: list[tuple[int, int, str]] = []
        while True:
            try:
                data = os.read(self.fd, 64 * 1024)
            except BlockingIOError:
                return found
            offset = 0
            while offset + _EVENT.size <= len(data):
                wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
                start = offset + _EVENT.size
                name = data[start : start + length].rstrip(b"\0").decode(errors="replace")
                found.append((wd, mask, name))
                offset = start + length

    def close(self) -> None:
        os.close(self.fd)


class Waker:
    """Blocks until a change may have happened, or a timeout."""

    def __init__(self, database_url: str, host: str) -> None:
        self.host = host
        self._url = database_url
        self._selector = selectors.DefaultSelector()
        self._read_pipe, self._write_pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._selector.register(self._read_pipe, selectors.EVENT_READ, "pipe")
        self._inotify: _Inotify | None = None
        self._db_watch: int | None = None
        self._db_names: set[str] = set()
        self._shm: str | None = None
        self.last_mark: bytes | None = None  # `commit_mark()` at the wake thread's last look
        self._pg: Any = None
        self._pg_fd = -1
        self._pg_retry_at = 0.0
        self.sources: list[str] = []
        self.heard_others = False  # notifications of other hosts' changes since last asked
        self._closed = False
        self._lock = threading.Lock()
        try:
            self._inotify = _Inotify()
            self._selector.register(self._inotify.fd, selectors.EVENT_READ, "inotify")
        except OSError as exc:
            log.warning("inotify unavailable (%s); SQLite commits wait for the poll", exc)
        url = make_url(database_url)
        if url.get_backend_name() == "sqlite":
            self._watch_sqlite(url.database)
        else:
            self._connect_pg()

    # --- sources

    def _watch_sqlite(self, database: str | None) -> None:
        if self._inotify is None or not database or database == ":memory:":
            return
        path = Path(database)
        try:
            self._db_watch = self._inotify.add(str(path.parent), IN_MODIFY | IN_CLOSE_WRITE)
        except OSError as exc:
            log.warning("cannot watch %s (%s); changes wait for the poll", path.parent, exc)
            return
        self._db_names = {path.name, f"{path.name}-wal"}
        self._shm = f"{path}-shm"
        self.sources.append("sqlite-inotify")

    def _connect_pg(self) -> None:
        import psycopg

        url = make_url(self._url).set(drivername="postgresql")
        try:
            conn = psycopg.connect(
                url.render_as_string(hide_password=False), autocommit=True, connect_timeout=5
            )
            conn.execute(f"LISTEN {CHANNEL}")
        except psycopg.Error as exc:
            log.warning("cannot LISTEN for changes (will retry): %s", str(exc).strip())
            self._pg_retry_at = time.monotonic() + RECONNECT_SECONDS
            return
        self._pg = conn
        self._pg_fd = conn.fileno()  # kept: a lost connection no longer tells its socket
        self._selector.register(self._pg_fd, selectors.EVENT_READ, "pg")
        if "pg-listen" not in self.sources:
            self.sources.append("pg-listen")

    def _drop_pg(self) -> None:
        if self._pg is None:
            return
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._selector.unregister(self._pg_fd)
        try:
            self._pg.close()
        except Exception as exc:  # a broken connection may fail to close
            log.debug("closing the LISTEN connection: %s", exc)
        self._pg = None
        self._pg_retry_at = time.monotonic() + RECONNECT_SECONDS

    def commit_mark(self) -> bytes | None:
        """SQLite's wal-index header (the first 48 bytes of the `-shm` file, documented in
        SQLite's WAL format): a committing writer updates it last, after its frames are in
        the log, and a reader's snapshot starts from it. So it changes exactly when a commit
        becomes visible. None without SQLite or when it cannot be read."""
        if self._shm is None:
            return None
        try:
            fd = os.open(self._shm, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            try:
                return os.pread(fd, 48, 0)
            finally:
                os.close(fd)
        except OSError:
            return None

    # --- waiting

    def wake(self) -> None:
        """Make a `wait` in progress (or the next one) return at once. Never after
        `close` (the pipe's descriptor number may belong to another file by then)."""
        with self._lock:
            if self._closed:
                return
            with contextlib.suppress(BlockingIOError):
                os.write(self._write_pipe, b"x")

    def wait(self, timeout: float) -> bool:
        """Sleep until something may have changed (True) or `timeout` passes (False)."""
        if self._pg is None and self._pg_retry_at and time.monotonic() >= self._pg_retry_at:
            self._connect_pg()
            if self._pg is not None:
                return True  # changes may have been missed while disconnected
        woken = False
        for key, _mask in self._selector.select(max(timeout, 0.0)):
            source = key.data
            if source == "pipe":
                while True:
                    try:
                        if not os.read(self._read_pipe, 4096):
                            break
                    except BlockingIOError:
                        break
                woken = True
            elif source == "inotify":
                woken |= self._inotify_events()
            elif source == "pg":
                woken |= self._pg_events()
        return woken

    def _inotify_events(self) -> bool:
        assert self._inotify is not None
        woken = False
        for wd, _mask, name in self._inotify.drain():
            woken |= wd == self._db_watch and name in self._db_names
        return woken

    def _pg_events(self) -> bool:
        import psycopg

        try:
            notes = list(self._pg.notifies(timeout=0, stop_after=None))
        except psycopg.Error as exc:
            log.warning("lost the change notifications (will reconnect): %s", str(exc).strip())
            self._drop_pg()
            return True
        if not notes:  # readable but nothing to read: is the connection still there?
            try:
                self._pg.execute("SELECT 1")
            except psycopg.Error:
                self._drop_pg()
                return True
        mine = any(n.payload in ("", self.host) for n in notes)
        self.heard_others |= bool(notes) and not mine
        return mine

    def close(self) -> None:
        """Release the connection, the inotify and the pipe (safe to call twice)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._drop_pg()
        if self._inotify is not None:
            self._inotify.close()
        self._selector.close()
        os.close(self._read_pipe)
        os.close(self._write_pipe)


# --- the agent's side (the agent is passed in; this module does not import the loop)

REAP_SECONDS = 1.0  # how often revokes in progress are polled while nothing wakes the agent
BACKSTOP_SECONDS = 5.0  # the change check still runs this often, in case a wake was missed
WAIT_SECONDS = RECONNECT_SECONDS  # the wake thread's longest sleep (LISTEN retried on time)
# A write seen on the SQLite log becomes visible when it commits: the commit mark is read
# again after each of these waits (1, 2, 4, then every 8 ms: 127 ms in all), or, where it
# cannot be read, the database is looked at again this much later. Never a longer step:
# while we watch for a commit that never comes (a checkpoint's write), a grant committed
# meanwhile waits for the next read (doubling to 64 ms made the p99 of commit -> ACL
# 44-49 ms in bench/bench_agent.py; 8 ms steps, 7-10 ms).
COMMIT_WAITS_SECONDS = (0.001, 0.002, 0.004) + (0.008,) * 15
SECOND_LOOKS_SECONDS = (0.005, 0.05)
EVENT_WINDOW = 64  # events that may still commit out of id order (see ChangeToken)


def backstop_seconds(settings: Any) -> float:
    """The change check's period when changes wake the agent."""
    return min(BACKSTOP_SECONDS, settings.reconcile_seconds)


class ChangeToken:
    """What moves when the database changes: the newest event id, how many events lie above
    a floor a little below it, and the newest outbox message id.

    The newest id alone can miss a change on PostgreSQL: ids come from a sequence, so a
    transaction holding a lower id can commit after one holding a higher id. Counting
    the events above the floor sees such a late commit too. Read on a connection of its
    own, kept open (no pool checkout, no ping: a fraction of a millisecond), dropped and
    opened again after an error. Not thread-safe: the agent reads it under its lock.
    """

    def __init__(self, db: Any) -> None:
        self._db = db
        self._conn: Any = None
        self.floor = 0

    def read(self) -> tuple[int, int, int] | None:
        """The token now, or None when the database cannot be read."""
        outbox = select(func.max(OutboxMessage.id)).scalar_subquery()
        stmt = select(func.max(Event.id), func.count(Event.id), outbox).where(Event.id > self.floor)
        try:
            if self._conn is None:
                self._conn = self._db.engine.connect()
            newest, count, message = self._conn.execute(stmt).one()
            self._conn.rollback()  # hold no snapshot between reads
        except (SQLAlchemyError, OSError) as exc:
            log.debug("change token unreadable: %s", exc)
            self.close()
            return None
        newest = newest or self.floor
        if newest - self.floor > 4 * EVENT_WINDOW:  # keep the counted range short
            self.floor = newest - EVENT_WINDOW
        return newest, count, message or 0

    def close(self) -> None:
        """Give the connection back (safe to call twice)."""
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None


def start(agent: Any) -> Waker | None:
    """A waker for this agent's database, or None (the agent then polls as before)."""
    try:
        waker = Waker(agent.settings.database_url, agent.host)
    except OSError as exc:
        log.warning("no change wake-ups (%s); polling instead", exc)
        return None
    log.info("agent wakes on: %s", ", ".join(waker.sources))
    return waker


def poke_on_stop(stop: threading.Event, waker: Waker) -> threading.Thread:
    """A thread that wakes whoever waits in `waker` when `stop` is set."""

    def wait() -> None:
        stop.wait()
        waker.wake()

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    return thread


def start_thread(agent: Any, waker: Waker, stop: threading.Event) -> threading.Thread:
    """The thread that sleeps in `waker` and, as soon as a change is heard, has the agent
    look at the database (`agent.on_change()`: reconcile when it moved). Its own thread, so
    a grant never waits behind the loop's slower steps (a sample on a busy host)."""

    def loop() -> None:
        waker.last_mark = waker.commit_mark()  # the agent has just reconciled
        while not stop.is_set():
            try:
                woken = waker.wait(WAIT_SECONDS)
            except Exception:  # the wake-ups only save latency: never let them stop the agent
                log.exception("waiting for changes failed; trying again shortly")
                stop.wait(WAIT_SECONDS)
                woken = True
            if stop.is_set():
                return
            try:
                if woken:
                    _look(agent, waker, stop)
                elif waker.heard_others:  # other hosts' changes: the shared steps care
                    waker.heard_others = False
                    agent.on_change()
            except Exception:
                log.exception("reacting to a change failed; the backstop check retries")

    thread = threading.Thread(target=loop, name="gpulocker-wake", daemon=True)
    thread.start()
    return thread


def _look(agent: Any, waker: Waker, stop: threading.Event) -> None:
    """Look at the database for the change that woke us. On SQLite the write heard on the
    log may not be committed yet: when the commit mark has not moved since our last look,
    watch it (COMMIT_WAITS_SECONDS) and look again once it moves; without a mark, look
    again after SECOND_LOOKS_SECONDS."""
    mark = waker.commit_mark()
    if agent.on_change() or "sqlite-inotify" not in waker.sources:
        waker.last_mark = mark
        return
    if mark is None:
        for delay in SECOND_LOOKS_SECONDS:
            if stop.wait(delay) or agent.on_change():
                return
        return
    if mark == waker.last_mark:  # nothing committed since the last look: wait for it
        for delay in COMMIT_WAITS_SECONDS:  # (a write heard late, or a checkpoint, never is)
            if stop.wait(delay):
                return
            if waker.commit_mark() != mark:
                agent.on_change()
                break
    waker.last_mark = waker.commit_mark()
