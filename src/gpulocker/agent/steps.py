"""The agent-step contract.

A step is an object with a `name`, a period (`every(settings)`, seconds between two runs)
and `run(view) -> bool`, the answer to "did I find work?". The step owns whatever state it
keeps between runs (the processes already punished, its background worker); the loop owns
only when each step is due. `run` sees the agent through `StepView`, a narrow view: the
context, this host, the newest GPU readings, the reaper and the heartbeat status. Steps that
live in the core (history, policies, disk, outbox, chat linking) take the narrower
`gpulocker.hostview.HostView`, since the core never imports agent/. A step fails alone:
an exception is logged and the loop goes on. A new step is one file (a class with these
three members) and one line in `agent.loop.default_steps()`.

The loop reports each answer (`Agent.tick()` returns step -> found work, which the tests
and bench/bench_agent.py read) but does not reschedule on it, because no step gains from an
earlier rerun: the work a step finds is either done in that run (reconcile, reap,
violations, history, policies) or handed to the step's own background worker (outbox,
disk, chat linking), which is busy until it is done; and the latency-critical steps
(reconcile, reap) already run at every 0.2 s poll. Rerunning history or policies early
would even be wrong: their period is what they promise (one sample per period, one
policy run per slot).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from gpulocker import heartbeat
from gpulocker.agent.access import Reaper
from gpulocker.config import Settings
from gpulocker.hostview import HostView

HEARTBEAT_SECONDS = 5.0


class StepView(HostView, Protocol):
    """The agent as a step under agent/ sees it."""

    reaper: Reaper

    def status(self) -> dict[str, Any]:
        """What the heartbeat reports."""
        ...


class AgentStep(Protocol):
    """One small piece of the agent's work and how often it runs."""

    name: str

    def every(self, settings: Settings) -> float:
        """Seconds between two runs."""
        ...

    def run(self, view: StepView) -> bool:
        """Do the work; True when there was work to do."""
        ...


@dataclass
class FunctionStep:
    """A step made of a function and a period (the loop's own steps, tests)."""

    name: str
    call: Callable[[StepView], bool]
    period: Callable[[Settings], float]

    def every(self, settings: Settings) -> float:
        return self.period(settings)

    def run(self, view: StepView) -> bool:
        return self.call(view)


class HeartbeatStep:
    """Tell the web side this agent is alive, with what it last did."""

    name = "heartbeat"

    def every(self, settings: Settings) -> float:
        return HEARTBEAT_SECONDS

    def run(self, view: StepView) -> bool:
        with view.ctx.db.transaction() as session:
            heartbeat.beat(session, heartbeat.agent_name(view.host), view.status())
        return False
