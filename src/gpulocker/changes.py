"""Change announcements: how an agent hears at once that the database changed (SPEC §10).

Every state change records an event (`events.record`), which marks its session. On
PostgreSQL the marked transaction runs `pg_notify(CHANNEL, host)` just before it commits,
so the notification is delivered exactly when (and only if) the change is committed, to
every agent on every host that LISTENs. On SQLite the agent shares the host with every
writer and watches the database's write-ahead log with inotify instead
(`gpulocker.agent.wake`), so nothing needs announcing.

The periodic reconcile stays the backstop: a notification missed while a connection was
down is caught by the next change check.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import event, func, select
from sqlalchemy.orm import Session

CHANNEL = "gpulocker_changes"
_MARK = "gpulocker.changed_hosts"


def mark(session: Session, host: str | None) -> None:
    """Note that this transaction changes something (of `host`, or of every host)."""
    session.info.setdefault(_MARK, set()).add(host or "")


def _before_commit(session: Session) -> None:
    changed: set[str] | None = session.info.pop(_MARK, None)
    if not changed:
        return
    bind = session.get_bind()
    if bind.dialect.name != "postgresql":
        return
    payload = "" if "" in changed or len(changed) > 1 else next(iter(changed))
    session.execute(select(func.pg_notify(CHANNEL, payload)))


def _forget(session: Session, *_args: Any) -> None:
    session.info.pop(_MARK, None)


def install() -> None:
    """Hook the announcement into every SQLAlchemy session (idempotent)."""
    if not event.contains(Session, "before_commit", _before_commit):
        event.listen(Session, "before_commit", _before_commit)
        event.listen(Session, "after_rollback", _forget)
