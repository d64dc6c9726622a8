"""The status of every GPU in one picture: inventory, live sample, holder, processes.

This is what `gpulocker status` shows and what the local socket's `status` operation
returns. It reads only what the agents published (inventory rows, live samples, active
allocations): a reader never queries a GPU.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from gpulocker import hosts, inventory, live, maintenance
from gpulocker.context import Context
from gpulocker.models import ACTIVE, Allocation, Gpu, utcnow


def snapshot(ctx: Context, with_users: bool = True) -> dict[str, Any]:
    """Every managed GPU with its newest sample and holder.

    `with_users=False` leaves out holders, processes, allocation ids and end times (for
    anonymous viewers), keeping the metrics and whether the GPU is taken (`held`).
    """
    samples = live.read(ctx)
    with ctx.db.session() as session:
        gpus = inventory.all_gpus(session)
        holders = {
            (a.host, a.gpu_id): a
            for a in session.scalars(select(Allocation).where(Allocation.state == ACTIVE))
        }
        in_maintenance = maintenance.enabled(session)
        by_host = hosts.health(session, ctx.settings)
    rows = [
        gpu_row(gpu, samples.get((gpu.host, gpu.gpu_id)), holders.get((gpu.host, gpu.gpu_id)))
        for gpu in gpus
    ]
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


def gpu_row(gpu: Gpu, sample: dict[str, Any] | None, holder: Allocation | None) -> dict[str, Any]:
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
        "held": holder is not None,
        "holder": holder.user if holder else None,
        "allocation_id": holder.id if holder else None,
        "expires_at": holder.expires_at.isoformat() if holder else None,
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
