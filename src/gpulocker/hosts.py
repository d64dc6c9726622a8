"""GPU hosts and the health of their agents (SPEC §10).

Each GPU host runs one agent, which beats (`heartbeat.agent_name(host)`) every few
seconds. A host whose agent has beaten before but not for AGENT_STALE_SECONDS is
*silent*: its GPUs are shown as unreachable and are not granted to new requests (nobody
would open their device files), while its allocations are left as they are (the files
stay as the agent last wrote them). A host that never beat is not silent: its agent
registers the GPUs and beats in the same first tick, and tests that have no agent at all
allocate as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, select
from sqlalchemy.orm import Session

from gpulocker import heartbeat
from gpulocker.config import Settings
from gpulocker.models import Gpu, Heartbeat, utcnow


@dataclass(frozen=True)
class HostHealth:
    """One GPU host as the web side sees it."""

    host: str
    age_seconds: float | None  # since the agent's last heartbeat; None: it never beat
    silent: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "agent": "unreachable"
            if self.silent
            else "ok"
            if self.age_seconds is not None
            else "unknown",
            "age_seconds": None if self.age_seconds is None else round(self.age_seconds, 3),
        }


def health(
    session: Session, settings: Settings, now: datetime | None = None
) -> dict[str, HostHealth]:
    """Every host that has GPUs in the inventory or an agent heartbeat, by name."""
    now = now or utcnow()
    names = set(session.scalars(select(Gpu.host).distinct()))
    beats = {row.name.split(":", 1)[1]: row for row in heartbeat.agents(session)}
    found = {}
    for host in sorted(names | set(beats)):
        row: Heartbeat | None = beats.get(host)
        age = None if row is None else (now - row.at).total_seconds()
        silent = age is not None and age > settings.agent_stale_seconds
        found[host] = HostHealth(host, age, silent)
    return found


_AGENT_BEATS = select(Heartbeat.name, Heartbeat.at).where(Heartbeat.name.like("agent:%"))


def silent_hosts(
    db: Session | Connection, settings: Settings, now: datetime | None = None
) -> set[str]:
    """Hosts whose agent stopped beating: their GPUs are not granted. Plain columns, so a
    Core connection reads them as cheaply as a session (`capacity.refuse_at_once`)."""
    now = now or utcnow()
    limit = settings.agent_stale_seconds
    return {
        name.split(":", 1)[1]
        for name, at in db.execute(_AGENT_BEATS)
        if (now - at).total_seconds() > limit
    }


def silence_note(silent: set[str], settings: Settings) -> str:
    """The part of a refusal that says which hosts were left out and why."""
    if not silent:
        return ""
    names = ", ".join(sorted(silent))
    return (
        f"; not counted: the GPUs of {names}, whose agent has been silent for more than "
        f"{settings.agent_stale_seconds:g} s (AGENT_STALE_SECONDS)"
    )
