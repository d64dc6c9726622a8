"""Delivering the outbox: every queued message goes out on its channel, in order, at least
once, retried with backoff while the channel is down, and never lost across a restart.

Rows are created by `notify()` in the transaction of the change they report. A sender
claims a row with a conditional UPDATE (moving its next attempt into the future), so two
agents never send the same message at once, and a sender that dies mid-send leaves a row
that becomes due again after CLAIM_SECONDS. Within one destination (channel + target)
only the oldest pending message may go, so a retried message is never overtaken.
Sending runs in a background thread of the agent: a slow channel never stalls enforcement.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from gpulocker.background import Worker
from gpulocker.config import Settings
from gpulocker.context import Context
from gpulocker.db import Database
from gpulocker.hostview import HostView
from gpulocker.models import OutboxMessage, utcnow
from gpulocker.notify import APPRISE, TELEGRAM, telegram
from gpulocker.notify.telegram import DeliveryError

log = logging.getLogger(__name__)

CLAIM_SECONDS = 120.0
FIRST_RETRY_SECONDS = 15.0
MAX_RETRY_SECONDS = 3600.0
BATCH = 500
_proxy_lock = threading.Lock()


def queue(session: Session, channel: str, target: str, kind: str, message: str) -> OutboxMessage:
    """Queue one message for one destination (no inbox row: for replies to a chat)."""
    now = utcnow()
    row = OutboxMessage(
        channel=channel,
        target=target,
        kind=kind,
        message=message,
        created_at=now,
        next_attempt_at=now,
    )
    session.add(row)
    return row


def backoff_seconds(attempts: int) -> float:
    """15 s, 30 s, 1 min, 2 min... capped at one hour: a long outage costs few requests."""
    return min(FIRST_RETRY_SECONDS * 2 ** max(0, attempts - 1), MAX_RETRY_SECONDS)


def pending(db: Database, limit: int = BATCH) -> list[OutboxMessage]:
    """Messages not yet sent nor given up, oldest first."""
    with db.session() as session:
        stmt = (
            select(OutboxMessage)
            .where(OutboxMessage.sent_at.is_(None), OutboxMessage.failed_at.is_(None))
            .order_by(OutboxMessage.id)
            .limit(limit)
        )
        return list(session.scalars(stmt))


def claim(db: Database, row: OutboxMessage, now: datetime) -> bool:
    """Take `row` for sending; False if another sender has it or it is not due."""
    with db.transaction() as session:
        result = session.execute(
            update(OutboxMessage)
            .where(
                OutboxMessage.id == row.id,
                OutboxMessage.sent_at.is_(None),
                OutboxMessage.failed_at.is_(None),
                OutboxMessage.next_attempt_at <= now,
            )
            .values(
                next_attempt_at=now + timedelta(seconds=CLAIM_SECONDS),
                attempts=OutboxMessage.attempts + 1,
            )
            .execution_options(synchronize_session=False)
        )
        claimed = bool(result.rowcount)  # type: ignore[attr-defined]
    if claimed:
        row.attempts += 1
    return claimed


def due_heads(db: Database, now: datetime, limit: int = BATCH) -> list[OutboxMessage]:
    """The oldest waiting message of each destination, for the destinations whose oldest is
    due now, soonest due first.

    Messages to one destination go in order, so only its oldest may be tried; and only the
    due ones are read, so any number of rows owed to a dead destination cost one row here
    and never crowd out the others (SPEC §12).
    """
    waiting = (OutboxMessage.sent_at.is_(None), OutboxMessage.failed_at.is_(None))
    heads = (
        select(func.min(OutboxMessage.id))
        .where(*waiting)
        .group_by(OutboxMessage.channel, OutboxMessage.target)
    )
    with db.session() as session:
        stmt = (
            select(OutboxMessage)
            .where(OutboxMessage.id.in_(heads), OutboxMessage.next_attempt_at <= now)
            .order_by(OutboxMessage.next_attempt_at, OutboxMessage.id)
            .limit(limit)
        )
        return list(session.scalars(stmt))


def deliver(ctx: Context, now: datetime | None = None) -> int:
    """Send what is due, a round over the destinations at a time (each round takes every
    destination's oldest due message), at most BATCH tries; returns how many went out."""
    sent = tries = 0
    blocked: set[tuple[str, str]] = set()
    while tries < BATCH:
        heads = [
            row
            for row in due_heads(ctx.db, now or utcnow(), BATCH - tries)
            if (row.channel, row.target) not in blocked
        ]
        if not heads:
            break
        for row in heads:
            tries += 1
            if _try(ctx, row, now):
                sent += 1
            elif row.failed_at is None:  # not given up: its destination waits this pass
                blocked.add((row.channel, row.target))
    return sent


def _try(ctx: Context, row: OutboxMessage, now: datetime | None) -> bool:
    """Claim and send one message; True if it went out."""
    if not claim(ctx.db, row, now or utcnow()):
        return False  # another sender has it
    try:
        send(ctx.settings, row)
    except DeliveryError as exc:
        _failed(ctx.db, row, exc, now or utcnow())
        if exc.permanent:
            row.failed_at = now or utcnow()
        return False
    _sent(ctx.db, row, now or utcnow())
    return True


def send(settings: Settings, row: OutboxMessage) -> None:
    """Hand one message to its channel; DeliveryError if it did not go."""
    if row.channel == TELEGRAM:
        telegram.send_message(settings, row.target, row.message)
    elif row.channel == APPRISE:
        send_apprise(settings, row.target, row.message)
    else:
        raise DeliveryError(f"unknown channel {row.channel!r}", permanent=True)


def send_apprise(settings: Settings, url: str, text: str) -> None:
    """One NOTIFY_URLS target through Apprise (mailto://, slack://, json://...)."""
    import apprise

    sender = apprise.Apprise()
    if not sender.add(url):
        raise DeliveryError("not a notification URL Apprise understands", permanent=True)
    with proxy_environment(settings.proxy_url):
        ok = sender.notify(title="GPULocker", body=text)
    if not ok:
        raise DeliveryError("the NOTIFY_URLS target did not accept the message")


@contextmanager
def proxy_environment(proxy_url: str | None) -> Iterator[None]:
    """Apprise has no proxy option; the requests library it uses reads HTTP(S)_PROXY, so
    PROXY_URL is put there for the duration of one send (under a lock: one send at a time)."""
    if not proxy_url:
        yield
        return
    names = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")
    with _proxy_lock:
        saved = {name: os.environ.get(name) for name in names}
        os.environ.update(dict.fromkeys(names, proxy_url))
        try:
            yield
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def _sent(db: Database, row: OutboxMessage, now: datetime) -> None:
    with db.transaction() as session:
        session.execute(
            update(OutboxMessage)
            .where(OutboxMessage.id == row.id)
            .values(sent_at=now, last_error=None)
            .execution_options(synchronize_session=False)
        )


def _failed(db: Database, row: OutboxMessage, exc: DeliveryError, now: datetime) -> None:
    """Give up on a permanent refusal; otherwise try again after the backoff (or the wait
    the service asked for)."""
    values: dict[str, object] = {"last_error": str(exc)[:2000]}
    if exc.permanent:
        values["failed_at"] = now
        log.warning("outbox message %s to %s refused for good: %s", row.id, row.channel, exc)
    else:
        delay = exc.retry_after if exc.retry_after is not None else backoff_seconds(row.attempts)
        values["next_attempt_at"] = now + timedelta(seconds=delay)
        log.info(
            "outbox message %s to %s failed (attempt %d), retry in %.0f s: %s",
            row.id,
            row.channel,
            row.attempts,
            delay,
            exc,
        )
    with db.transaction() as session:
        session.execute(
            update(OutboxMessage)
            .where(OutboxMessage.id == row.id)
            .values(values)
            .execution_options(synchronize_session=False)
        )


def has_due(db: Database, now: datetime | None = None) -> bool:
    """Whether some destination's oldest waiting message is due (work for the sender)."""
    return bool(due_heads(db, now or utcnow(), limit=1))


def stats(db: Database, now: datetime | None = None) -> dict[str, float | int]:
    """For health and metrics: messages waiting, given up, and the oldest wait in seconds."""
    now = now or utcnow()
    waiting = (OutboxMessage.sent_at.is_(None), OutboxMessage.failed_at.is_(None))
    with db.session() as session:
        pending_count = session.scalar(select(func.count()).where(*waiting)) or 0
        failed_count = (
            session.scalar(select(func.count()).where(OutboxMessage.failed_at.is_not(None))) or 0
        )
        oldest = session.scalar(select(func.min(OutboxMessage.created_at)).where(*waiting))
    age = (now - oldest).total_seconds() if oldest is not None else 0.0
    return {"pending": pending_count, "failed": failed_count, "oldest_pending_seconds": age}


def _deliver_quietly(ctx: Context) -> None:
    try:
        deliver(ctx)
    except Exception:  # a database hiccup must not kill the thread's owner; next pass retries
        log.exception("outbox delivery pass failed")


RECHECK_SECONDS = 15.0  # retries (15 s backoff and up) are looked for at least this often


class OutboxStep:
    """Agent step: start a delivery pass in the background (its own worker) when messages
    are due, so a slow channel never stalls the loop. Looked for every second, or, while
    the agent counts the database's changes (`HostView.change_count`: a new message is
    one), when that count moved and every RECHECK_SECONDS for retries coming due."""

    name = "outbox"

    def __init__(self) -> None:
        self.worker = Worker("outbox")
        self._heard: int | None = None
        self._recheck_at = 0.0

    def every(self, settings: Settings) -> float:
        return 1.0

    def run(self, view: HostView) -> bool:
        if self.worker.busy:
            return False
        heard, now = view.change_count(), time.monotonic()
        if heard is not None and heard == self._heard and now < self._recheck_at:
            return False
        self._heard, self._recheck_at = heard, now + RECHECK_SECONDS
        if not has_due(view.ctx.db):
            return False
        return self.worker.start(_deliver_quietly, view.ctx)
