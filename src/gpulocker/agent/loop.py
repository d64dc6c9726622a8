"""The agent: the one privileged process of a GPU host. It makes the device files say what
the database says, ends the processes that may no longer run, and reports what it sees.

This module is the loop: timing, the stop flag, change detection and the steps. The loop's
own steps are sample, reconcile and reap; the others come from `default_steps()` (the step
contract is `agent/steps.py`). What reconcile does is `agent/reconcile.py`.

Reconcile runs every RECONCILE_SECONDS, and at once when the events table changes (every
grant and release records an event) or a device file's inode change time moves (chmod,
setfacl, a re-created file): `run` sleeps in `agent/wake.py`, which a committed change
(pg_notify / inotify on SQLite's log) or a touched device file wakes; the change check
then runs every 5 s only as a backstop. Without a waker (tests calling `tick()`, inotify
missing) it is the 0.2 s poll.
A device file's change is also heard by the watch thread (inotify, `agent/watch.py`),
which reconciles at once under `reconcile_lock` while the loop may be busy sampling.

Embedding (`gpulocker serve`): `agent, stop, thread = start_in_thread(ctx)` runs the agent
in a daemon thread; `stop.set(); thread.join()` ends it.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any

from sqlalchemy import func, select

from gpulocker import events, inventory, live
from gpulocker.agent import access, holders, localapi, wake, watch
from gpulocker.agent.reconcile import DB_ERRORS, Holding, Plan, Reconciler
from gpulocker.agent.steps import AgentStep, FunctionStep, HeartbeatStep, StepView
from gpulocker.agent.wake import Waker
from gpulocker.config import Settings
from gpulocker.context import Context
from gpulocker.gpus import GpuBackend, GpuSample, make_backend
from gpulocker.inventory import TypedGpu
from gpulocker.models import Event
from gpulocker.notify import notify

log = logging.getLogger(__name__)

POLL_SECONDS = 0.2  # how often the change counter is read and the reaper polled
EVENT_WINDOW = 64  # events that may still commit out of id order (see _change_token)


def default_steps() -> list[AgentStep]:
    """The steps after the loop's own (sample, reconcile, reap), in the order a tick runs
    them. A new step: one file with its class, one line here."""
    from gpulocker.agent.violations import ViolationsStep
    from gpulocker.disk import DiskStep
    from gpulocker.history import HistoryStep
    from gpulocker.notify.linking import TelegramLinkStep
    from gpulocker.notify.outbox import OutboxStep
    from gpulocker.policies import PoliciesStep
    from gpulocker.scheduler_step import SchedulerStep

    return [
        ViolationsStep(),
        HeartbeatStep(),
        HistoryStep(),
        PoliciesStep(),
        SchedulerStep(),
        OutboxStep(),
        TelegramLinkStep(),
        DiskStep(),
    ]


class Agent:
    """The loop of steps on one host. Tests call `tick()`; production calls `run(stop)`.
    It is the `StepView` its steps see."""

    def __init__(
        self,
        ctx: Context,
        backend: GpuBackend | None = None,
        steps: list[AgentStep] | None = None,
    ) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self.host = self.settings.gpu_host
        self.backend = backend if backend is not None else make_backend(self.settings)
        self.gpus: list[TypedGpu] = inventory.assign_types(
            self.settings.gpu_config, self.backend.inventory()
        )
        self.samples: dict[int, GpuSample] = {}
        self.sweep = holders.sweep_for(self.settings)  # descriptor holders (SPEC 13)
        if getattr(self.backend, "sweeps_descriptors", False):
            self.backend.sweep = self.sweep  # type: ignore[attr-defined]
        self.reaper = access.Reaper(self.settings.kill_grace_seconds)
        self.reconciler = Reconciler(ctx, self.host, self.gpus, self.reaper)
        self.waker: Waker | None = None  # set by run(): changes wake the loop (agent/wake.py)
        self.steps = steps if steps is not None else self.own_steps() + default_steps()
        self.registered = False
        self.started = False
        self.last_tick_ms = 0.0
        self._health: dict[int, tuple[bool, str | None]] = {}
        self._due: dict[str, float] = {}
        self._seen_token: tuple[int, int] | None = None
        self._event_floor = 0
        self._next_full = 0.0
        self.watch_restores = 0  # reconciles started by the inotify watch (agent/watch.py)
        self.reconcile_lock = threading.RLock()  # the loop and the watch thread reconcile

    def own_steps(self) -> list[AgentStep]:
        """The loop's own steps: read the GPUs, reconcile when due, finish revokes."""
        return [
            FunctionStep("sample", lambda view: self.sample(), _sample_every),
            FunctionStep("reconcile", lambda view: self.reconcile_if_due(), self._check_every),
            FunctionStep("reap", lambda view: self.finish_revokes(), self._reap_every),
        ]

    def _check_every(self, settings: Settings) -> float:
        """The change check: every 0.2 s poll, or a 5 s backstop when changes wake us."""
        return wake.backstop_seconds(settings) if self.waker else POLL_SECONDS

    def _reap_every(self, settings: Settings) -> float:
        return wake.REAP_SECONDS if self.waker else POLL_SECONDS

    def step(self, name: str) -> AgentStep:
        """The step called `name` (KeyError if there is none)."""
        for step in self.steps:
            if step.name == name:
                return step
        raise KeyError(name)

    @property
    def devices(self) -> dict[int, str]:
        """Managed GPU index -> its device file."""
        return {g.info.index: g.info.device for g in self.gpus}

    @property
    def plan(self) -> Plan | None:
        return self.reconciler.plan

    @property
    def revoking(self) -> dict[int, tuple[Holding, list[int]]]:
        return self.reconciler.revoking

    @property
    def db_ok(self) -> bool:
        return self.reconciler.db_ok

    @property
    def reconciled_at(self) -> str | None:
        return self.reconciler.reconciled_at

    # --- the loop

    def start(self) -> bool:
        """First thing: put this host's GPUs in the inventory and restore the right access.
        True when a file had to be corrected."""
        self.started = True
        self.register()
        changed = self.reconcile()
        self._next_full = time.monotonic() + self.settings.reconcile_seconds
        return changed

    def tick(self, force: bool = False) -> dict[str, bool]:
        """Run every due step once (every step when `force`); returns step -> found work."""
        if not self.started:
            self._run_step(FunctionStep("start", lambda view: self.start(), _poll_every))
        began = time.monotonic()
        results = {}
        for step in self.steps:
            if not force and self._due.get(step.name, 0.0) > began:
                continue
            results[step.name] = self._run_step(step)
            self._due[step.name] = time.monotonic() + step.every(self.settings)
        self.last_tick_ms = (time.monotonic() - began) * 1000
        return results

    def _run_step(self, step: AgentStep) -> bool:
        view: StepView = self
        try:
            return bool(step.run(view))
        except Exception:
            log.exception("agent step %s failed; the loop goes on", step.name)
            return False

    def run(self, stop: threading.Event) -> None:
        """Tick until `stop` is set (SIGTERM sets it in `gpulocker agent`)."""
        log.info(
            "agent on %s: %d GPU(s) managed (%s)", self.host, len(self.gpus), self.backend.name
        )
        self.waker = wake.start(self)
        if self.waker is not None:
            threading.Thread(target=_wake_on_stop, args=(stop, self.waker), daemon=True).start()
        watcher = watch.start_thread(self, stop)  # restores a changed device file at once
        try:
            while not stop.is_set():
                self.tick()
                if self.waker is None:
                    stop.wait(self._sleep_seconds())
                else:
                    wake.sleep(self, stop)
        finally:
            if watcher is not None:
                watcher.join(timeout=5)
            self.close()
            log.info("agent on %s stopped", self.host)

    def _sleep_seconds(self) -> float:
        if not self._due:
            return POLL_SECONDS
        wait = min(self._due.values()) - time.monotonic()
        return min(max(wait, 0.01), POLL_SECONDS)

    def seconds_to_next_step(self) -> float:
        """How long until a step is due (for a sleep that a change may cut short)."""
        if not self._due:
            return 0.0
        return max(min(self._due.values()) - time.monotonic(), 0.0)

    def run_soon(self, step: str, delay: float = 0.0) -> None:
        """Make step `step` due within `delay` seconds (a change woke the agent)."""
        self._due[step] = min(self._due.get(step, 0.0), time.monotonic() + delay)

    def close(self) -> None:
        """Release the GPU backend. Processes still being ended are ended again after a
        restart (their allocations keep access_removed_at empty until then)."""
        if self.reaper.pending:
            log.info("stopping with %d process(es) still being ended", len(self.reaper.pending))
        if self.waker is not None:
            self.waker.close()
            self.waker = None
        self.backend.close()

    # --- sampling

    def sample(self) -> bool:
        """Read every GPU, publish the readings for the web side, record health changes."""
        if not self.registered:
            self.register()
        managed = self.devices
        samples = [s for s in self.backend.sample() if s.index in managed]
        sweep = not getattr(self.backend, "sweeps_descriptors", False)
        holders.unite(samples, managed, self.settings, sweep=sweep, sweeper=self.sweep)
        self.samples = {s.index: s for s in samples}
        live.publish(self.ctx, self.host, samples)
        self.update_health(samples)
        return bool(samples)

    # --- inventory and health

    def register(self) -> bool:
        """Upsert this host's GPUs in the inventory (retried by the sample step on failure)."""
        try:
            with self.ctx.db.transaction() as session:
                inventory.register(session, self.host, self.gpus)
        except DB_ERRORS as exc:
            log.error("cannot register the GPUs of %s (will retry): %s", self.host, exc)
            return False
        self.registered = True
        return True

    def update_health(self, samples: list[GpuSample]) -> bool:
        """Record GPUs that turned unhealthy or recovered; tell the admins once per change."""
        changed = [
            s for s in samples if self._health.get(s.index) != (s.ok, None if s.ok else s.error)
        ]
        if not changed:
            return False
        with self.ctx.db.transaction() as session:
            for sample in changed:
                error = None if sample.ok else sample.error
                if inventory.set_health(session, self.host, sample.index, sample.ok, error):
                    self._record_health(session, sample)
        for sample in changed:
            self._health[sample.index] = (sample.ok, None if sample.ok else sample.error)
        return True

    def _record_health(self, session: Any, sample: GpuSample) -> None:
        state = "healthy again" if sample.ok else f"unhealthy: {sample.error}"
        message = f"GPU {sample.index} on {self.host} is {state}"
        kind = "gpu_healthy" if sample.ok else "gpu_unhealthy"
        events.record(session, kind, "agent", message, host=self.host, gpu_id=sample.index)
        if not sample.ok:
            notify(session, self.settings, kind, message, admins=True)

    # --- reconcile: when (here) and what (agent/reconcile.py)

    def reconcile_if_due(self) -> bool:
        """Reconcile when something changed in the database or on a device file, or when
        RECONCILE_SECONDS passed."""
        now = time.monotonic()
        token = self._change_token()
        changed = token is not None and token != self._seen_token
        if not changed and not self.reconciler.files_touched() and now < self._next_full:
            return False
        if token is not None:
            self._seen_token = token
        self._next_full = now + self.settings.reconcile_seconds
        return self.reconcile()

    def _change_token(self) -> tuple[int, int] | None:
        """The newest event id and how many events lie above a floor a little below it.

        The newest id alone can miss a change on PostgreSQL: ids come from a sequence, so a
        transaction holding a lower id can commit after one holding a higher id. Counting
        the events above the floor sees such a late commit too. Two index range reads.
        """
        try:
            with self.ctx.db.session() as session:
                newest, count = session.execute(
                    select(func.max(Event.id), func.count(Event.id)).where(
                        Event.id > self._event_floor
                    )
                ).one()
        except DB_ERRORS:
            return None
        newest = newest or self._event_floor
        if newest - self._event_floor > 4 * EVENT_WINDOW:  # keep the counted range short
            self._event_floor = newest - EVENT_WINDOW
        return newest, count

    def reconcile(self) -> bool:
        """Make every managed device file say what the database says (a full pass)."""
        with self.reconcile_lock:
            return self.reconciler.reconcile()

    def finish_revokes(self) -> bool:
        """SIGKILL what outlived its grace; finish revokes whose processes are gone."""
        with self.reconcile_lock:
            return self.reconciler.finish_revokes()

    # --- liveness

    def status(self) -> dict[str, Any]:
        """What the heartbeat reports."""
        return {
            "tick_ms": round(self.last_tick_ms, 3),
            "pid": os.getpid(),
            "backend": self.backend.name,
            "gpus": len(self.gpus),
            "db_ok": self.db_ok,
            "reconciled_at": self.reconciled_at,
            "revoking": len(self.revoking),
            "sweep_slices": self.sweep.slices,
        }


def _wake_on_stop(stop: threading.Event, waker: Waker) -> None:
    stop.wait()
    waker.wake()


def _sample_every(settings: Settings) -> float:
    return settings.gpus_status_refresh_rate_seconds


def _poll_every(settings: Settings) -> float:
    return POLL_SECONDS


# --- running it


def start_in_thread(ctx: Context) -> tuple[Agent, threading.Event, threading.Thread]:
    """Run an agent in a daemon thread (for `gpulocker serve`); set the event to stop it."""
    agent = Agent(ctx)
    stop = threading.Event()
    # The local socket (terminal commands) is served while the agent runs.
    thread = threading.Thread(
        target=localapi.serve_while,
        args=(ctx, lambda: agent.run(stop)),
        name="gpulocker-agent",
        daemon=True,
    )
    thread.start()
    return agent, stop, thread


def serve_forever(ctx: Context) -> None:
    """`gpulocker agent`: run until SIGTERM or SIGINT, then stop cleanly."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    agent = Agent(ctx)
    localapi.serve_while(ctx, lambda: agent.run(stop))  # the local socket, while the agent runs
