"""The database: engine, sessions and schema migrations.

SQLite by default (WAL, in STATE_DIR), PostgreSQL by DATABASE_URL. Writers on SQLite
take the write lock when they begin (`BEGIN IMMEDIATE`), so a read-then-write
transaction never fails half way with "database is locked"; correctness still comes
from the constraints, not from that lock.
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from gpulocker import changes, safefs
from gpulocker.config import ConfigError
from gpulocker.errors import Unavailable

log = logging.getLogger(__name__)
changes.install()  # committed changes are announced to the agents (pg_notify)

MIGRATIONS = Path(__file__).parent / "migrations"


def _try_flock(fd: int) -> bool:
    """Take the exclusive flock of `fd` if nobody holds it; False when it is taken."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def normalize_url(url: str) -> str:
    """`postgresql://` means psycopg 3 here (the driver we install)."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine with the per-database settings GPULocker relies on."""
    url = normalize_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True, **kwargs)
    if parsed.database and parsed.database != ":memory:":
        database = Path(parsed.database)
        folder = database.parent
        try:
            # Not readable by others outside systemd either (SPEC §12): 0700 folder, 0600
            # database; SQLite gives the WAL and SHM the database's mode.
            # A setgid folder is shared with the web's own group (install, or `serve` as
            # root with an unprivileged web half): there the group keeps read-write.
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            shared = bool(os.lstat(folder).st_mode & stat.S_ISGID)
            fd = safefs.open_nofollow(
                database, os.O_RDONLY | os.O_CREAT, 0o660 if shared else 0o600
            )
            os.close(fd)
            for suffix in ("", "-wal", "-shm"):
                safefs.make_private(f"{database}{suffix}", shared=shared)
        except OSError as exc:
            raise ConfigError(
                f"STATE_DIR: expected a directory GPULocker can create for the database "
                f"(DATABASE_URL), got {str(folder)!r} ({exc.strerror})"
            ) from None
    engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves, below
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        immediate = conn.get_execution_options().get("immediate", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


class Database:
    """Owns the engine; hands out read sessions and write transactions."""

    def __init__(self, url: str, **engine_kwargs: Any) -> None:
        self.url = normalize_url(url)
        self.engine = make_engine(self.url, **engine_kwargs)
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        writer = self.engine.execution_options(immediate=True)
        self._reads = sessionmaker(self.engine, expire_on_commit=False)
        self._writes = sessionmaker(writer, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session for reading; nothing is committed."""
        with self._reads() as session:
            yield session

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A write transaction: committed when the block ends, rolled back on error."""
        with self._writes() as session, session.begin():
            yield session

    @contextmanager
    def serialized(
        self,
        key: str,
        check: Callable[[Session], None] | None = None,
        quick: Callable[[Connection], None] | None = None,
    ) -> Iterator[Session]:
        """A write transaction that waits its turn behind others of the same `key`.

        For hot spots where many writers want the same rows at once (allocation requests):
        waiting on a lock wakes the next writer the moment the previous one commits, instead
        of SQLite's busy handler sleeping in steps up to 100 ms, or PostgreSQL's losers of a
        race failing on the unique index and trying again. PostgreSQL: a transaction-scoped
        advisory lock. SQLite: `flock` on a file beside the database (one per key), taken
        before BEGIN IMMEDIATE; without that file (no right to create it) it is a plain
        transaction. Correctness never rests on this lock, only speed under contention.

        Two refusals on a read, so a hopeless writer never takes the write lock (the write
        itself must check everything again): `check(session)`, the full rules, and
        `quick(conn)`, a few Core statements for a writer whose turn came after others'
        (the ones before may have taken what it wanted). Where they run is this
        backend's choice:

        - SQLite: the writers are processes on this host's cores. One that finds the turn
          free takes it and runs `check`. One that must wait does nothing until its turn
          comes, then runs `quick` and, if that passes, `check`. So while one writes, the
          others sleep instead of competing with it for the CPU: the line moves at the
          speed of one writer (bench/bench_race.py).
        - PostgreSQL: `check` before waiting, so refusals are answered in parallel
          without the lock; `quick` once the lock is held.
        """
        if not self.is_sqlite:
            if check is not None:
                with self.session() as session:
                    check(session)
            with self.transaction() as session:
                session.execute(
                    text("SELECT pg_advisory_xact_lock(hashtext(:key))"),
                    {"key": f"gpulocker:{key}"},
                )
                if quick is not None:
                    quick(session.connection())
                yield session
            return
        fd = self._lock_file(key)
        try:
            if fd is not None and not _try_flock(fd):  # someone is writing: wait, asleep
                fcntl.flock(fd, fcntl.LOCK_EX)
                if quick is not None:
                    with self.engine.connect() as conn:
                        quick(conn)
            if check is not None:
                with self.session() as session:
                    check(session)
            with self.transaction() as session:
                yield session
        finally:
            if fd is not None:
                os.close(fd)  # closing releases the lock

    def _lock_file(self, key: str) -> int | None:
        database = make_url(self.url).database
        if not database or database == ":memory:":
            return None
        path = f"{database}.{key}.lock"
        flags = os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            return os.open(path, os.O_RDONLY | os.O_CREAT | flags, 0o644)
        except PermissionError:
            try:  # made by another account: reading is enough to flock it
                return os.open(path, os.O_RDONLY | flags)
            except OSError:
                return None
        except OSError:
            return None

    def upgrade(self) -> None:
        """Bring the schema to the newest migration (safe to run every start).

        An unreachable database is an `Unavailable` naming DATABASE_URL, not a traceback.
        """
        try:
            upgrade(self.engine)
        except OperationalError as exc:
            reason = str(exc.orig or exc).strip().splitlines()[0]
            shown = make_url(self.url).render_as_string(hide_password=True)
            raise Unavailable(
                f"DATABASE_URL: cannot use the database at {shown}: {reason}"
            ) from None

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()


def alembic_config() -> AlembicConfig:
    """Alembic's configuration, pointing at the migrations shipped in the package."""
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply migrations up to `revision` on `engine`."""
    cfg = alembic_config()
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, revision)


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at (None = empty database)."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str | None:
    """The newest revision shipped in the package."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()
