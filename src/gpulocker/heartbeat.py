"""Heartbeats: a long-running process says it is alive; others ask how long ago it did."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from gpulocker.config import Settings
from gpulocker.models import Heartbeat, utcnow


def agent_name(host: str) -> str:
    """The heartbeat name of the agent of `host`."""
    return f"agent:{host}"


def beat(session: Session, name: str, data: dict[str, Any] | None = None) -> None:
    """Record that `name` is alive now (with optional details, e.g. the last tick time).
    One UPDATE when it beat before (an agent does this every few seconds, idle or not)."""
    now = utcnow()
    done = session.execute(
        update(Heartbeat)
        .where(Heartbeat.name == name)
        .values(at=now, data=data)
        .execution_options(synchronize_session=False)
    )
    if not done.rowcount:  # type: ignore[attr-defined]
        session.add(Heartbeat(name=name, at=now, data=data))


def last(session: Session, name: str) -> Heartbeat | None:
    """The last heartbeat of `name`, if it ever beat."""
    return session.get(Heartbeat, name)


def age_seconds(session: Session, name: str, now: datetime | None = None) -> float | None:
    """Seconds since `name` last beat; None if it never did."""
    row = last(session, name)
    if row is None:
        return None
    return ((now or utcnow()) - row.at).total_seconds()


def is_stale(age: float | None, settings: Settings) -> bool:
    """Whether an agent silent for `age` seconds (None: never beat) counts as gone: the one
    threshold, AGENT_STALE_SECONDS (SPEC section 10), used by every surface."""
    return age is None or age > settings.agent_stale_seconds


def agents_alive(session: Session, settings: Settings, hosts: Iterable[str]) -> bool:
    """Whether the agent of every one of `hosts` beat within AGENT_STALE_SECONDS."""
    return not any(is_stale(age_seconds(session, agent_name(h)), settings) for h in set(hosts))


_AGENTS = select(Heartbeat).where(Heartbeat.name.like("agent:%")).order_by(Heartbeat.name)


def agents(session: Session) -> list[Heartbeat]:
    """Every agent that ever beat (one per GPU host). Read by every request and every
    scheduling pass: the statement is built once."""
    return list(session.scalars(_AGENTS))
