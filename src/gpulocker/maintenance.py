"""Maintenance mode: while on, only admins may allocate; existing allocations stay."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from gpulocker import events
from gpulocker.config import Settings
from gpulocker.db import Database
from gpulocker.errors import Forbidden, Maintenance
from gpulocker.models import Setting, utcnow

KEY = "maintenance"


_VALUE = select(Setting.value).where(Setting.key == KEY)


def enabled(session: Session) -> bool:
    """Whether maintenance mode is on."""
    value = session.execute(_VALUE).scalar()
    return bool(isinstance(value, dict) and value.get("enabled"))


def refuse_if_on(session: Session, settings: Settings, actor: str) -> None:
    """Refuse (403 `maintenance`) a new allocation while maintenance mode is on; admins
    pass."""
    if enabled(session) and not settings.is_admin(actor):
        raise Maintenance("GPULocker is in maintenance mode: new allocations are paused")


def set_enabled(db: Database, settings: Settings, actor: str, on: bool, message: str = "") -> None:
    """Admin: switch maintenance mode on or off."""
    if not settings.is_admin(actor):
        raise Forbidden("only admins can switch maintenance mode")
    with db.transaction() as session:
        row = session.get(Setting, KEY)
        value = {"enabled": on, "message": message}
        if row is None:
            session.add(Setting(key=KEY, value=value, updated_at=utcnow(), updated_by=actor))
        else:
            row.value, row.updated_at, row.updated_by = value, utcnow(), actor
        state = "on" if on else "off"
        events.record(session, "maintenance", actor, f"maintenance mode {state}", data=value)
