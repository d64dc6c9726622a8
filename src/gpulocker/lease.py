"""Named leases in the database: at most one holder at a time, across processes and hosts.

A lease is a row in `leases` (name, holder, expires_at). Taking it is a conditional
UPDATE ("mine already, or expired") and, when the row does not exist yet, an INSERT that
the primary key lets only one process win. Nothing is held in memory, so a holder that
crashes simply stops renewing and another process takes over once the lease expires.
"""

from __future__ import annotations

import os
import socket
import uuid
from datetime import datetime, timedelta

from sqlalchemy import or_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql.elements import ColumnElement

from gpulocker.db import Database
from gpulocker.models import Lease, utcnow

PROCESS_ID = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

# How far a lease may end beyond what a caller's own clock allows before it counts as
# taken under a clock since stepped back. Callers read their clock before they wait for
# the row (or SQLite's write lock), and hosts' clocks differ a little: without this slack
# a caller that read its clock a millisecond before the winner committed took the lease
# too (two processes ran a once-per-period job; CI saw it with six racing processes).
CLOCK_SLACK = timedelta(seconds=30)


def _free(now: datetime, until: datetime) -> tuple[ColumnElement[bool], ...]:
    """A lease is free when it has expired, or when it ends later than any lease of this
    length taken now could, by more than `CLOCK_SLACK`: the wall clock was stepped back
    since it was taken. Without the second test a clock stepped back by T would stall
    expiry (and the lease's holder's failover) for T; leases span hosts, so a monotonic
    clock cannot be shared instead."""
    return (Lease.expires_at <= now, Lease.expires_at > until + CLOCK_SLACK)


def acquire(db: Database, name: str, seconds: float, holder: str = PROCESS_ID) -> bool:
    """Take or renew lease `name` for `seconds`; True if `holder` has it now."""
    now = utcnow()
    until = now + timedelta(seconds=seconds)
    with db.transaction() as session:
        result = session.execute(
            update(Lease)
            .where(Lease.name == name, or_(Lease.holder == holder, *_free(now, until)))
            .values(holder=holder, expires_at=until)
            .execution_options(synchronize_session=False)
        )
        if result.rowcount:  # type: ignore[attr-defined]
            return True
        if session.get(Lease, name) is not None:
            return False
    try:
        with db.transaction() as session:
            session.add(Lease(name=name, holder=holder, expires_at=until))
    except IntegrityError:
        return False  # another process inserted it first
    return True


def claim_slot(db: Database, name: str, seconds: float, holder: str = PROCESS_ID) -> bool:
    """Claim the next run of a periodic job: True for exactly one caller per `seconds`.

    Unlike `acquire`, the current holder does not renew: everybody (the holder too) waits
    until the slot's time is up, so the job runs once per period whoever asks.
    """
    now = utcnow()
    until = now + timedelta(seconds=seconds)
    with db.transaction() as session:
        result = session.execute(
            update(Lease)
            .where(Lease.name == name, or_(*_free(now, until)))
            .values(holder=holder, expires_at=until)
            .execution_options(synchronize_session=False)
        )
        if result.rowcount:  # type: ignore[attr-defined]
            return True
        if session.get(Lease, name) is not None:
            return False
    try:
        with db.transaction() as session:
            session.add(Lease(name=name, holder=holder, expires_at=until))
    except IntegrityError:
        return False
    return True


def release(db: Database, name: str, holder: str = PROCESS_ID) -> bool:
    """Give lease `name` up now (clean shutdown) so another process need not wait."""
    with db.transaction() as session:
        result = session.execute(
            update(Lease)
            .where(Lease.name == name, Lease.holder == holder)
            .values(expires_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]


def holder_of(db: Database, name: str) -> str | None:
    """Who holds lease `name` now (None when nobody or it expired)."""
    with db.session() as session:
        row = session.get(Lease, name)
        if row is None or row.expires_at <= utcnow():
            return None
        return row.holder
