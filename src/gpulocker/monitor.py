"""History: every GPU_ACTIVITY_CHECK_MINUTES the agent stores each GPU's utilization,
memory, holder and process count, and drops rows older than GPU_UTILIZATION_HISTORY_DAYS.

The rows feed the history charts and the idle policy. Only fresh, healthy readings are
stored: a failed GPU or a stale reading leaves a gap, and a gap never counts as idle.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Protocol

from sqlalchemy import delete, select

from gpulocker.config import Settings
from gpulocker.context import Context
from gpulocker.gpus import GpuSample as LiveSample
from gpulocker.models import ACTIVE, Allocation, GpuSample, utcnow

log = logging.getLogger(__name__)


class AgentView(Protocol):
    """What the steps of this package need from the agent that runs them."""

    ctx: Context
    settings: Settings
    host: str
    samples: dict[int, LiveSample]


def max_sample_age(settings: Settings) -> timedelta:
    """How old a live reading may be and still count as "now" (a few sampling periods)."""
    return timedelta(seconds=max(3 * settings.gpus_status_refresh_rate_seconds, 30.0))


def record(
    ctx: Context, host: str, samples: Iterable[LiveSample], now: datetime | None = None
) -> int:
    """Store one history row per healthy, fresh sample of `host`'s GPUs. Returns the count."""
    now = now or utcnow()
    fresh = [
        s
        for s in samples
        if s.ok and s.utilization is not None and now - s.at <= max_sample_age(ctx.settings)
    ]
    if not fresh:
        return 0
    with ctx.db.transaction() as session:
        active = select(Allocation.gpu_id, Allocation.user).where(
            Allocation.host == host, Allocation.state == ACTIVE
        )
        holders = {gpu_id: user for gpu_id, user in session.execute(active)}
        session.add_all(
            GpuSample(
                host=host,
                gpu_id=s.index,
                at=s.at,
                utilization=float(s.utilization or 0.0),
                memory_used_mib=float(s.memory_used_mib or 0.0),
                holder=holders.get(s.index),
                processes=len(s.processes),
            )
            for s in fresh
        )
    return len(fresh)


def prune(ctx: Context, host: str, gpu_ids: Iterable[int], now: datetime | None = None) -> int:
    """Delete `host`'s rows older than the retention, GPU by GPU (so the index is used)."""
    cutoff = (now or utcnow()) - timedelta(days=ctx.settings.gpu_utilization_history_days)
    deleted = 0
    with ctx.db.transaction() as session:
        for gpu_id in gpu_ids:
            result = session.execute(
                delete(GpuSample).where(
                    GpuSample.host == host, GpuSample.gpu_id == gpu_id, GpuSample.at < cutoff
                )
            )
            deleted += result.rowcount  # type: ignore[attr-defined]
    return deleted


def history_step(agent: AgentView) -> bool:
    """Agent step: record the newest samples and prune old rows. True if it wrote anything."""
    written = record(agent.ctx, agent.host, list(agent.samples.values()))
    pruned = prune(agent.ctx, agent.host, list(agent.samples))
    if pruned:
        log.info(
            "pruned %d history rows older than %g days",
            pruned,
            agent.settings.gpu_utilization_history_days,
        )
    return bool(written or pruned)


def history_every(settings: Settings) -> float:
    """The history step's period in seconds (GPU_ACTIVITY_CHECK_MINUTES)."""
    return settings.gpu_activity_check_minutes * 60.0
