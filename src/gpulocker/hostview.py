"""What a step of the agent that lives in the core (history, policies, disk, outbox, chat
linking) may see of the agent running it: its context, this host, the newest GPU readings.

The agent's contract (`agent/steps.py`) widens this view for the steps that live under
agent/; the core never imports agent/, so its steps are typed with this one.
"""

from __future__ import annotations

from typing import Protocol

from gpulocker.config import Settings
from gpulocker.context import Context
from gpulocker.gpus import GpuSample


class HostView(Protocol):
    """The agent as a core step sees it (read-only by convention)."""

    ctx: Context
    settings: Settings
    host: str
    samples: dict[int, GpuSample]

    def change_count(self) -> int | None:
        """How often the agent saw the database change (a new event or outbox message),
        while it keeps this fresh (it hears commits at once and checks every 5 s anyway);
        None when it does not, and a step that wants to know must read for itself. A step
        may skip its own read while the count stands still."""
        ...
