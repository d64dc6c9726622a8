"""Retention (SPEC section 12): each table keeps what is younger than its setting, loses
exactly the older rows it may lose, in batches, one pruner per period; and /metrics shows
how big every table is. On SQLite and PostgreSQL alike."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import event, func, insert, select, text

from gpulocker import lease, retention
from gpulocker.config import ConfigError, Settings, load_settings
from gpulocker.context import Context
from gpulocker.db import Database
from gpulocker.gpus import GpuSample as LiveSample
from gpulocker.models import (
    Allocation,
    Base,
    Event,
    Gpu,
    GpuSample,
    Notification,
    OutboxMessage,
    utcnow,
)
from gpulocker.web import create_app
from tests.conftest import TEST_HOST
from tests.helpers import ALICE, BOB

DAY = timedelta(days=1)
KEEP = {
    "event_retention_days": 10.0,
    "gpu_utilization_history_days": 2.0,
    "notification_retention_days": 5.0,
    "outbox_retention_days": 3.0,
}


@dataclass
class View:
    """What a core step sees of its agent."""

    ctx: Context
    settings: Settings
    host: str = TEST_HOST
    samples: dict[int, LiveSample] = field(default_factory=dict)


def counts(db: Database) -> dict[str, int]:
    """Exact rows of every table (count(*), on both databases)."""
    with db.session() as session:
        return {
            name: int(session.scalar(select(func.count()).select_from(table)) or 0)
            for name, table in Base.metadata.tables.items()
        }


def ids(db: Database, model: Any) -> set[int]:
    with db.session() as session:
        return set(session.scalars(select(model.id)))


def add(db: Database, model: Any, **values: Any) -> int:
    with db.transaction() as session:
        return int(session.execute(insert(model).values(**values).returning(model.id)).scalar_one())


def an_event(db: Database, at: datetime, allocation_id: int | None = None) -> int:
    return add(db, Event, at=at, kind="test", actor="test", message="", allocation_id=allocation_id)


def an_allocation(db: Database, state: str, gpu_id: int, at: datetime) -> int:
    return add(
        db,
        Allocation,
        user=ALICE,
        host=TEST_HOST,
        gpu_id=gpu_id,
        gpu_type="4090",
        device=f"/dev/nvidia{gpu_id}",
        created_at=at,
        expires_at=at + timedelta(days=30),
        state=state,
    )


def a_sample(db: Database, host: str, gpu_id: int, at: datetime) -> int:
    return add(db, GpuSample, host=host, gpu_id=gpu_id, at=at, utilization=1, memory_used_mib=1)


def a_notification(db: Database, at: datetime, read: bool) -> int:
    return add(
        db,
        Notification,
        user=BOB,
        kind="test",
        message="m",
        created_at=at,
        read_at=at + timedelta(minutes=1) if read else None,
    )


def an_outbox_row(
    db: Database, created: datetime, sent: datetime | None = None, failed: datetime | None = None
) -> int:
    return add(
        db,
        OutboxMessage,
        channel="telegram",
        target="1",
        kind="test",
        message="m",
        created_at=created,
        next_attempt_at=created,
        sent_at=sent,
        failed_at=failed,
    )


def test_it_keeps_what_is_younger_than_each_setting_and_deletes_only_older_rows(
    settings: Settings, db: Database
) -> None:
    ctx = Context(settings.with_overrides(**KEEP))
    now = utcnow()
    edge = timedelta(minutes=1)
    registered = ids(db, Event)  # the inventory's own events, from now
    active = an_allocation(db, "active", 0, now - 40 * DAY)
    released = an_allocation(db, "released", 1, now - 40 * DAY)
    old_events = {an_event(db, now - 10 * DAY - edge), an_event(db, now - 30 * DAY, released)}
    young_events = {an_event(db, now - 10 * DAY + edge), an_event(db, now - 30 * DAY, active)}
    # Samples: 2 days, GPU by GPU, on this host and another one the inventory knows.
    add(db, Gpu, host="otherhost", gpu_id=0, gpu_type="4090", minor=0, device="/x", seen_at=now)
    old_samples = {
        a_sample(db, h, g, now - 2 * DAY - edge) for h, g in [(TEST_HOST, 3), ("otherhost", 0)]
    }
    young_samples = {a_sample(db, TEST_HOST, g, now - 2 * DAY + edge) for g in range(6)}
    old_notes = {a_notification(db, now - 5 * DAY - edge, read=True)}
    young_notes = {
        a_notification(db, now - 50 * DAY, read=False),  # unread: kept however old
        a_notification(db, now - 5 * DAY + edge, read=True),
    }
    old_outbox = {
        an_outbox_row(db, now - 9 * DAY, sent=now - 3 * DAY - edge),
        an_outbox_row(db, now - 9 * DAY, failed=now - 4 * DAY),
    }
    young_outbox = {
        an_outbox_row(db, now - 90 * DAY),  # never sent: kept however old
        an_outbox_row(db, now - 9 * DAY, sent=now - 3 * DAY + edge),
    }
    newest_event = an_event(db, now - 20 * DAY)  # the change counter stays, whatever its age
    before = counts(db)

    result = retention.prune(ctx, now)

    assert result.done and result.pruned == {
        "events": 2,
        "gpu_samples": 2,
        "notifications": 1,
        "outbox": 2,
    }
    assert ids(db, Event) == registered | young_events | {newest_event}
    assert ids(db, GpuSample) == young_samples
    assert ids(db, Notification) == young_notes
    assert ids(db, OutboxMessage) == young_outbox
    after = counts(db)
    expected = {**before}
    for table, deleted in result.pruned.items():
        expected[table] -= deleted
    assert after == expected  # nothing else was touched
    assert old_events and old_samples and old_notes and old_outbox
    assert retention.prune(ctx, now).total == 0  # a second pass finds nothing
    ctx.close()


def test_samples_of_the_idle_window_stay_and_zero_keeps_for_ever(
    settings: Settings, db: Database
) -> None:
    now = utcnow()
    short = Context(settings.with_overrides(gpu_utilization_history_days=0.1))  # 2.4 h < 8 h
    inside = a_sample(db, TEST_HOST, 0, now - timedelta(hours=7))
    outside = a_sample(db, TEST_HOST, 0, now - timedelta(hours=9))
    assert retention.prune(short, now).pruned["gpu_samples"] == 1
    assert ids(db, GpuSample) == {inside}
    short.close()

    for_ever = Context(
        settings.with_overrides(**dict.fromkeys(KEEP, 0.0))  # 0: keep every table's rows
    )
    an_event(db, now - 4000 * DAY)
    an_event(db, now)
    a_notification(db, now - 4000 * DAY, read=True)
    a_notification(db, now, read=True)
    before = counts(db)
    assert not retention.enabled(for_ever.settings)
    assert retention.prune(for_ever, now).total == 0
    assert counts(db) == before and outside not in ids(db, GpuSample)
    for_ever.close()


def test_it_deletes_in_batches_of_at_most_one_batch_per_statement(
    settings: Settings, db: Database
) -> None:
    ctx = Context(settings.with_overrides(**KEEP))
    now = utcnow()
    registered = ids(db, Event)
    with db.transaction() as session:
        session.execute(
            insert(Event),
            [{"at": now - 20 * DAY, "kind": "old", "actor": "t", "message": ""}] * 2500,
        )
        session.execute(
            insert(GpuSample),
            [
                {
                    "host": TEST_HOST,
                    "gpu_id": i % 6,
                    "at": now - 3 * DAY - i * timedelta(seconds=1),
                    "utilization": 0,
                    "memory_used_mib": 0,
                }
                for i in range(2500)
            ],
        )
    young = an_event(db, now)
    deletes: list[int] = []

    def seen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("DELETE"):
            deletes.append(cursor.rowcount)

    event.listen(ctx.db.engine, "after_cursor_execute", seen)
    first = retention.prune(ctx, now, batch=1000, max_batches=2)
    assert (first.pruned["events"], first.pruned["gpu_samples"], first.done) == (2000, 2000, False)
    assert retention.describe(ctx.settings, first).endswith("more left for the next pass")
    second = retention.prune(ctx, now, batch=1000, max_batches=2)
    assert (second.pruned["events"], second.pruned["gpu_samples"], second.done) == (500, 500, True)
    assert deletes == [1000, 1000, 1000, 1000, 500, 500]
    assert ids(db, Event) == registered | {young} and ids(db, GpuSample) == set()
    ctx.close()


def test_the_step_runs_one_pass_per_period_and_writes_an_audit_event(
    settings: Settings, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = Context(settings.with_overrides(**KEEP))
    now = utcnow()
    for _ in range(3):
        an_event(db, now - 30 * DAY)
    an_event(db, now)
    assert retention.RetentionStep().run(View(ctx, ctx.settings)) is False  # just started
    one, other = retention.RetentionStep(first_after=0), retention.RetentionStep(first_after=0)
    monkeypatch.setattr(retention, "BATCH", 2)
    monkeypatch.setattr(retention, "MAX_BATCHES", 1)

    assert one.run(View(ctx, ctx.settings)) is True
    assert one.worker.join(30)
    # It left one row, so it gave the lease back and the next step goes on at once.
    assert lease.holder_of(ctx.db, retention.LEASE) is None
    assert other.run(View(ctx, ctx.settings)) is True
    assert other.worker.join(30)
    # Done: the period's lease is held, so no agent prunes again before it ends.
    assert lease.holder_of(ctx.db, retention.LEASE) == lease.PROCESS_ID
    assert one.run(View(ctx, ctx.settings)) is False
    with db.session() as session:
        audit = list(session.scalars(select(Event).where(Event.kind == "pruned")))
    assert [e.data for e in audit] == [{"events": 2}, {"events": 1}]
    assert audit[0].actor == "retention"
    assert "pruned 2 events (older than 10 d); more left" in audit[0].message
    ctx.close()


def test_the_settings_parse_strictly_and_default_sensibly(tmp_path: Any) -> None:
    base = {"STATE_DIR": str(tmp_path), "GPULOCKER_ENV_FILE": "/dev/null"}
    default = load_settings(base)
    assert (
        default.event_retention_days,
        default.gpu_utilization_history_days,
        default.notification_retention_days,
        default.outbox_retention_days,
    ) == (365.0, 7.0, 90.0, 30.0)
    never = load_settings({**base, "EVENT_RETENTION_DAYS": "never", "OUTBOX_RETENTION_DAYS": "0"})
    assert (never.event_retention_days, never.outbox_retention_days) == (0.0, 0.0)
    assert (
        load_settings({**base, "NOTIFICATION_RETENTION_DAYS": "0.5"}).notification_retention_days
        == 0.5
    )
    with pytest.raises(ConfigError) as info:
        load_settings({**base, "NOTIFICATION_RETENTION_DAYS": "-1"})
    assert str(info.value) == (
        "NOTIFICATION_RETENTION_DAYS: expected a number of days >= 0, or never "
        "(0 = keep for ever), got '-1'"
    )


def test_metrics_show_the_rows_of_every_table(settings: Settings, db: Database) -> None:
    ctx = Context(settings)
    now = utcnow()
    events = len(ids(db, Event)) + 7
    with db.transaction() as session:
        session.execute(insert(Event), [{"at": now, "kind": "k", "actor": "t", "message": ""}] * 7)
        if not db.is_sqlite:
            session.execute(text("SELECT pg_stat_force_next_flush()"))  # the estimate, now
    exact = counts(db)
    rows, is_exact = retention.table_rows(ctx.db)
    assert is_exact is db.is_sqlite
    assert set(rows) == set(Base.metadata.tables) and "queued_requests" in rows
    assert rows["events"] == exact["events"] == events
    if db.is_sqlite:  # the estimate of rows another connection wrote may lag a second or so
        assert rows == exact
    body = create_app(ctx=ctx).test_client().get("/metrics").get_data(as_text=True)
    assert "# TYPE gpulocker_table_rows gauge" in body
    assert f'gpulocker_table_rows{{table="events"}} {events}' in body
    assert 'gpulocker_table_rows{table="gpu_samples"} 0' in body
    assert ("exact, count(*)" in body) is db.is_sqlite
    assert ("pg_stat_user_tables.n_live_tup" in body) is not db.is_sqlite
    ctx.close()
