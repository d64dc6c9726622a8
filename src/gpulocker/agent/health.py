"""GPU health as the agent samples it: a GPU that turns unhealthy or recovers is recorded
in the inventory and as an event, and the admins are told, once per change."""

from __future__ import annotations

from typing import Any

from gpulocker import events, inventory
from gpulocker.context import Context
from gpulocker.gpus import GpuSample
from gpulocker.notify import notify


class GpuHealth:
    """The last health seen of each GPU of one host (index -> ok, error)."""

    def __init__(self, ctx: Context, host: str) -> None:
        self.ctx = ctx
        self.host = host
        self._seen: dict[int, tuple[bool, str | None]] = {}

    def update(self, samples: list[GpuSample]) -> bool:
        """Record GPUs that turned unhealthy or recovered; tell the admins once per change."""
        changed = [s for s in samples if self._seen.get(s.index) != _state(s)]
        if not changed:
            return False
        with self.ctx.db.transaction() as session:
            for sample in changed:
                ok, error = _state(sample)
                if inventory.set_health(session, self.host, sample.index, ok, error):
                    self._record(session, sample)
        for sample in changed:
            self._seen[sample.index] = _state(sample)
        return True

    def _record(self, session: Any, sample: GpuSample) -> None:
        state = "healthy again" if sample.ok else f"unhealthy: {sample.error}"
        message = f"GPU {sample.index} on {self.host} is {state}"
        kind = "gpu_healthy" if sample.ok else "gpu_unhealthy"
        events.record(session, kind, "agent", message, host=self.host, gpu_id=sample.index)
        if not sample.ok:
            notify(session, self.ctx.settings, kind, message, admins=True)


def _state(sample: GpuSample) -> tuple[bool, str | None]:
    return sample.ok, None if sample.ok else sample.error
