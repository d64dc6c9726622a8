"""The status of every GPU in one picture: inventory, live sample, holder, processes.

This is what `gpulocker status` shows and what the local socket's `status` operation
returns. It reads only what the agents published (inventory rows, live samples, active
allocations): a reader never queries a GPU.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import and_, select
from sqlalchemy.orm import Session

from gpulocker import hosts, live, maintenance
from gpulocker.context import Context
from gpulocker.models import ACTIVE, Allocation, Gpu, utcnow


class Line(NamedTuple):
    """A managed GPU and its holder (None when free), read in one query."""

    host: str
    gpu_id: int
    gpu_type: str
    name: str
    device: str
    healthy: bool
    error: str | None
    mig: bool
    memory_total_mib: int
    holder: str | None
    allocation_id: int | None
    expires_at: datetime | None


_held = and_(
    Allocation.host == Gpu.host, Allocation.gpu_id == Gpu.gpu_id, Allocation.state == ACTIVE
)
_LINES = (
    select(Gpu.host, Gpu.gpu_id, Gpu.gpu_type, Gpu.name, Gpu.device, Gpu.healthy, Gpu.error)
    .add_columns(Gpu.mig, Gpu.memory_total_mib, Allocation.user, Allocation.id)
    .add_columns(Allocation.expires_at)
    .outerjoin(Allocation, _held)
    .where(Gpu.error.is_distinct_from("not managed"))
    .order_by(Gpu.host, Gpu.gpu_id)
)  # built once: the status is polled every few seconds by every open page


def _lines(session: Session) -> list[Line]:
    """Every managed GPU with its active allocation, by host and id: one query of plain
    rows (the status of 8 hosts is 256 of them)."""
    return list(map(Line._make, session.connection().execute(_LINES).all()))


def snapshot(ctx: Context, with_users: bool = True) -> dict[str, Any]:
    """Every managed GPU with its newest sample and holder.

    `with_users=False` leaves out holders, processes, allocation ids and end times (for
    anonymous viewers), keeping the metrics and whether the GPU is taken (`held`).
    """
    samples = live.read(ctx)
    with ctx.db.session() as session:
        lines = _lines(session)
        in_maintenance = maintenance.enabled(session)
        by_host = hosts.health(session, ctx.settings)
    rows = [gpu_row(line, samples.get((line.host, line.gpu_id))) for line in lines]
    for row in rows:
        known = by_host.get(row["host"])
        row["reachable"] = known is None or not known.silent
    if not with_users:  # anonymous: metrics only, nothing about who holds what until when
        for row in rows:
            row.update(holder=None, processes=[], allocation_id=None, expires_at=None)
    return {
        "at": utcnow().isoformat(),
        "maintenance": in_maintenance,
        "gpus": rows,
        "hosts": [h.to_dict() for h in by_host.values()],
    }


def gpu_row(gpu: Line, sample: dict[str, Any] | None) -> dict[str, Any]:
    """One GPU's line of the status: the inventory row merged with its live sample."""
    sample = sample or {}
    failed = bool(sample) and not sample.get("ok", True)
    return {
        "host": gpu.host,
        "gpu_id": gpu.gpu_id,
        "gpu_type": gpu.gpu_type,
        "name": gpu.name,
        "device": gpu.device,
        "healthy": gpu.healthy and not failed,
        "error": sample.get("error") if failed else gpu.error,
        "mig": gpu.mig,
        "sampled_at": sample.get("at"),
        "utilization": sample.get("utilization"),
        "memory_used_mib": sample.get("memory_used_mib"),
        "memory_total_mib": sample.get("memory_total_mib") or gpu.memory_total_mib,
        "temperature_c": sample.get("temperature_c"),
        "power_w": sample.get("power_w"),
        "held": gpu.allocation_id is not None,
        "holder": gpu.holder,
        "allocation_id": gpu.allocation_id,
        "expires_at": gpu.expires_at.isoformat() if gpu.expires_at else None,
        "processes": [
            {
                "pid": p.get("pid"),
                "user": p.get("user"),
                "memory_mib": p.get("memory_mib"),
                "name": p.get("name", ""),
            }
            for p in sample.get("processes") or []
        ],
    }
