"""Retention: old rows are deleted in small batches, so the database stays the size its
settings say (SPEC section 12), and how big each table is (`/metrics`).

What is pruned, after how long, and what never is:

| table | kept for | never pruned |
|---|---|---|
| `events` | `EVENT_RETENTION_DAYS` (365) | the newest event; events of an active allocation |
| `gpu_samples` | `GPU_UTILIZATION_HISTORY_DAYS` (7) | the last `REVOKE_IDLE_GPU_AFTER_HOURS` |
| `notifications` | `NOTIFICATION_RETENTION_DAYS` (90), read ones | unread ones |
| `outbox` | `OUTBOX_RETENTION_DAYS` (30) after it was sent or given up | a row still waiting |

0 (or `never`) keeps a table's rows for ever. The newest event stays because its id is the
change counter agents and pages watch, and SQLite would give a deleted newest id to the next
row; the newest notification and outbox row stay for the same reason (a page holding that id
must not reach someone else's row). The idle policy reads the last idle window of samples.

A batch reads up to `BATCH` ids in a read transaction, then deletes them by primary key in a
write transaction of its own that repeats the condition (a row that changed in between
stays): SQLite's write lock lasts one short DELETE. A pass does at most `MAX_BATCHES`
batches per table and stops after `PASS_SECONDS`; what it left waits for the next pass.

The agent's `retention` step runs the passes in a background thread (the loop keeps its
pace), one process across hosts per period: it claims the hour's slot of the lease
`retention` (`lease.claim_slot`); a pass that had to leave work gives the lease back, so
the next step of any agent (a minute later) goes on with it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, literal, or_, select, text, union_all
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from gpulocker import (
    events,
    lease,
    scheduling_models,  # noqa: F401  (its tables join Base.metadata)
)
from gpulocker.background import Worker
from gpulocker.config import Settings
from gpulocker.context import Context
from gpulocker.db import Database
from gpulocker.hostview import HostView
from gpulocker.models import (
    ACTIVE,
    Allocation,
    Base,
    Event,
    Gpu,
    GpuSample,
    Notification,
    OutboxMessage,
    utcnow,
)

log = logging.getLogger(__name__)

BATCH = 1000
MAX_BATCHES = 20  # per table and pass: 20 000 rows
PASS_SECONDS = 2.0
ACTOR = "retention"
LEASE = "retention"
STEP_SECONDS = 60.0  # how often an agent asks whether a pass is due
PERIOD_SECONDS = 3600.0  # one pass per hour (more while a pass leaves work)
Where = Callable[[datetime], list[ColumnElement[bool]]]


def _newest(model: Any) -> ColumnElement[bool]:
    """Not the table's newest row (see the module's docstring)."""
    return model.id < select(func.max(model.id)).scalar_subquery()


def _events(cutoff: datetime) -> list[ColumnElement[bool]]:
    active = select(Allocation.id).where(Allocation.state == ACTIVE)
    return [
        Event.at < cutoff,
        _newest(Event),
        or_(Event.allocation_id.is_(None), Event.allocation_id.not_in(active)),
    ]


def _notifications(cutoff: datetime) -> list[ColumnElement[bool]]:
    return [
        Notification.read_at.is_not(None),
        Notification.created_at < cutoff,
        _newest(Notification),
    ]


def _outbox(cutoff: datetime) -> list[ColumnElement[bool]]:
    # NULL < cutoff is not true: a row neither sent nor given up is never matched.
    done = or_(OutboxMessage.sent_at < cutoff, OutboxMessage.failed_at < cutoff)
    return [done, _newest(OutboxMessage)]


def _samples(cutoff: datetime) -> list[ColumnElement[bool]]:
    return [GpuSample.at < cutoff]


def _sample_keep(settings: Settings) -> timedelta:
    days = settings.gpu_utilization_history_days
    if days <= 0:
        return timedelta(0)
    return max(timedelta(days=days), timedelta(hours=settings.revoke_idle_gpu_after_hours))


@dataclass(frozen=True)
class Rule:
    """One table's retention: how long rows stay (0 = for ever) and which may go."""

    table: str
    model: Any
    keep: Callable[[Settings], timedelta]
    where: Where

    def ids(self, session: Session, cutoff: datetime, limit: int) -> list[int]:
        """Ids of up to `limit` rows to delete, oldest first."""
        if self.model is GpuSample:
            return _sample_ids(session, cutoff, limit)
        order = Event.at if self.model is Event else self.model.id
        stmt = select(self.model.id).where(*self.where(cutoff)).order_by(order).limit(limit)
        return list(session.scalars(stmt))


def _sample_ids(session: Session, cutoff: datetime, limit: int) -> list[int]:
    """GPU by GPU, so each query is a range of the (host, gpu_id, at) index, not a scan."""
    found: list[int] = []
    for host, gpu_id in session.execute(select(Gpu.host, Gpu.gpu_id).order_by(Gpu.id)):
        stmt = (
            select(GpuSample.id)
            .where(GpuSample.host == host, GpuSample.gpu_id == gpu_id, GpuSample.at < cutoff)
            .limit(limit - len(found))
        )
        found += session.scalars(stmt)
        if len(found) >= limit:
            break
    return found


def _days(name: str) -> Callable[[Settings], timedelta]:
    return lambda settings: timedelta(days=max(0.0, getattr(settings, name)))


RULES = (
    Rule("events", Event, _days("event_retention_days"), _events),
    Rule("gpu_samples", GpuSample, _sample_keep, _samples),
    Rule("notifications", Notification, _days("notification_retention_days"), _notifications),
    Rule("outbox", OutboxMessage, _days("outbox_retention_days"), _outbox),
)


@dataclass
class PassResult:
    """What one pass deleted per table, and whether it got through everything due."""

    pruned: dict[str, int] = field(default_factory=dict)
    done: bool = True

    @property
    def total(self) -> int:
        return sum(self.pruned.values())


def enabled(settings: Settings) -> bool:
    """True when some table has a retention (not every one kept for ever)."""
    return any(rule.keep(settings) > timedelta(0) for rule in RULES)


def prune(
    ctx: Context,
    now: datetime | None = None,
    *,
    batch: int | None = None,
    max_batches: int | None = None,
    seconds: float | None = None,
) -> PassResult:
    """One bounded pass over every table with a retention (see the module's docstring);
    BATCH, MAX_BATCHES and PASS_SECONDS unless given."""
    now = now or utcnow()
    batch, max_batches = batch or BATCH, max_batches or MAX_BATCHES
    deadline = time.monotonic() + (seconds or PASS_SECONDS)
    result = PassResult()
    for rule in RULES:
        keep = rule.keep(ctx.settings)
        if keep <= timedelta(0):
            continue
        deleted, finished = _prune_table(ctx.db, rule, now - keep, batch, max_batches, deadline)
        result.pruned[rule.table] = deleted
        result.done = result.done and finished
    return result


def _prune_table(
    db: Database, rule: Rule, cutoff: datetime, batch: int, max_batches: int, deadline: float
) -> tuple[int, bool]:
    """(rows deleted, True if none is left to delete)."""
    deleted = 0
    for _ in range(max_batches):
        if time.monotonic() > deadline:
            return deleted, False
        with db.session() as session:
            ids = rule.ids(session, cutoff, batch)
        if not ids:
            return deleted, True
        with db.transaction() as session:
            done = session.execute(
                delete(rule.model)
                .where(rule.model.id.in_(ids), *rule.where(cutoff))
                .execution_options(synchronize_session=False)
            )
            deleted += done.rowcount  # type: ignore[attr-defined]
        if len(ids) < batch:
            return deleted, True
    return deleted, False


def describe(settings: Settings, result: PassResult) -> str:
    """`pruned 1200 events (older than 365 d), ...` for the log and the audit event."""
    parts = []
    for rule in RULES:
        count = result.pruned.get(rule.table, 0)
        if count:
            days = rule.keep(settings).total_seconds() / 86400
            parts.append(f"{count} {rule.table} (older than {days:g} d)")
    more = "" if result.done else "; more left for the next pass"
    return "pruned " + ", ".join(parts) + more


def record(ctx: Context, result: PassResult) -> None:
    """The pass's audit event (written to the log too), when it pruned something."""
    if not result.total:
        return
    message = describe(ctx.settings, result)
    with ctx.db.transaction() as session:
        data = {table: n for table, n in result.pruned.items() if n}
        events.record(session, "pruned", ACTOR, message, data=data)


def run_pass(ctx: Context) -> PassResult:
    """One pass, logged and audited. One that left work gives the period's lease back, so
    the next step (of whichever agent) goes on instead of waiting for the next period."""
    result = prune(ctx)
    record(ctx, result)
    if not result.done:
        lease.release(ctx.db, LEASE)
    return result


def _run_quietly(ctx: Context) -> None:
    try:
        run_pass(ctx)
    except Exception:  # a database hiccup must not kill the worker; the next pass retries
        log.exception("retention pass failed")


class RetentionStep:
    """Agent step: a pruning pass in the background when this process wins the lease."""

    name = "retention"

    def __init__(self, first_after: float = STEP_SECONDS) -> None:
        self.worker = Worker("retention")
        # A starting agent enforces first: the first pass waits a step's period.
        self._not_before = time.monotonic() + first_after

    def every(self, settings: Settings) -> float:
        return STEP_SECONDS

    def run(self, view: HostView) -> bool:
        if self.worker.busy or time.monotonic() < self._not_before or not enabled(view.settings):
            return False
        if not lease.claim_slot(view.ctx.db, LEASE, PERIOD_SECONDS - STEP_SECONDS / 2):
            return False
        return self.worker.start(_run_quietly, view.ctx)


# --- table sizes (/metrics)


def table_rows(db: Database) -> tuple[dict[str, int], bool]:
    """Rows per table of the schema, and whether they are exact.

    SQLite: count(*) of every table in one statement (exact; a scan of each table's
    smallest index). PostgreSQL: the statistics' live-row counts (pg_stat_user_tables), an
    estimate that follows commits within seconds, read without touching the tables.
    """
    tables = sorted(Base.metadata.tables)
    with db.session() as session:
        if db.is_sqlite:
            parts = [
                select(literal(name), func.count()).select_from(Base.metadata.tables[name])
                for name in tables
            ]
            rows = session.execute(union_all(*parts)).all()
            return {str(name): int(n) for name, n in rows}, True
        found = session.execute(
            text(
                "SELECT relname, n_live_tup FROM pg_stat_user_tables "
                "WHERE schemaname = current_schema()"
            )
        ).all()
    counts = {str(name): max(0, int(n)) for name, n in found}
    return {name: counts.get(name, 0) for name in tables}, False
