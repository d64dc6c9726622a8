"""The events log's kinds on SQLite and PostgreSQL: a loose index scan that gives what
`SELECT DISTINCT kind` gives, without reading every event."""

from __future__ import annotations

from sqlalchemy import select

from gpulocker import events
from gpulocker.db import Database
from gpulocker.models import Event


def test_kinds_are_every_kind_recorded_sorted(db: Database) -> None:
    with db.transaction() as s:
        s.execute(Event.__table__.delete())
    with db.session() as s:
        assert events.kinds(s) == []
    with db.transaction() as s:
        for kind in ("released", "granted", "zz_last", "granted", "a_first", "released"):
            events.record(s, kind, "test", "a message")
    with db.session() as s:
        distinct = sorted(s.scalars(select(Event.kind).distinct()))
        assert events.kinds(s) == distinct == ["a_first", "granted", "released", "zz_last"]
