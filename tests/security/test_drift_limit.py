"""A loop of chmods is undone every time but recorded once a minute per file (SPEC §12)."""

from __future__ import annotations

import os
import stat

import time_machine
from sqlalchemy import select

from gpulocker.agent.loop import Agent
from gpulocker.config import Settings
from gpulocker.context import Context
from gpulocker.db import Database
from gpulocker.gpus.simulated import device_file
from gpulocker.models import Event, utcnow


def drift_events(db: Database, path: str) -> list[Event]:
    with db.session() as s:
        rows = s.scalars(select(Event).where(Event.kind == "drift").order_by(Event.id))
        return [e for e in rows if e.data and e.data.get("device") == path]


def test_a_chmod_loop_is_always_undone_but_recorded_once_a_minute(
    settings: Settings, db: Database
) -> None:
    path = str(device_file(settings.device_path, 0))
    ctx = Context(settings)
    agent = Agent(ctx)
    with time_machine.travel(utcnow(), tick=False) as clock:
        agent.tick()
        for _ in range(25):  # a student's (or a broken tool's) loop, 5 a second
            os.chmod(path, 0o666)  # noqa: S103 - the attack
            agent.tick(force=True)
            assert stat.S_IMODE(os.stat(path).st_mode) & 0o007 == 0  # undone every time
            clock.shift(0.2)
        assert len(drift_events(db, path)) == 1
        clock.shift(60)
        os.chmod(path, 0o666)  # noqa: S103
        agent.tick(force=True)
    events = drift_events(db, path)
    assert len(events) == 2
    assert events[1].data is not None and events[1].data["coalesced"] == 24
    ctx.close()
