"""The agent: the one privileged process of a GPU host. It makes the device files say what
the database says, ends the processes that may no longer run, and reports what it sees.

This module is the loop: timing, the stop flag, change detection and the steps. The loop's
own steps are sample, reconcile and reap; the others come from `default_steps()` (the step
contract is `agent/steps.py`). What reconcile does is `agent/reconcile.py`.

Reconcile runs every RECONCILE_SECONDS, and at once when the events table changes (every
grant and release records an event) or a device file's inode change time moves (chmod,
setfacl, a re-created file). Three threads, so that nothing urgent waits behind a slow
step (a sample on a busy host):

- the loop (`run`): the steps, each at its period;
- the wake thread (`agent/wake.py`): a committed change (pg_notify / inotify on SQLite's
  log) wakes it and it reconciles at once (`on_change`); the loop's change check then
  runs every 5 s only as a backstop. Without a waker (tests calling `tick()`, inotify
  missing) the loop's check is the 0.2 s poll;
- the watch thread (`agent/watch.py`): a changed device file is put back at once from
  the plan the last reconcile applied (`restore`), without the database.

Reconciles (loop, wake thread) hold `reconcile_lock`; restores only the reconciler's short
`files_lock`. The local socket is served (`run(stop, ready)`) once the first reconcile and
heartbeat are done, so a request over it finds the agent enforcing.

Embedding (`gpulocker serve`): `agent, stop, thread = start_in_thread(ctx)` runs the agent
in a daemon thread; `stop.set(); thread.join()` ends it.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from gpulocker import inventory, live
from gpulocker.agent import access, holders, localapi, wake, watch
from gpulocker.agent.health import GpuHealth
from gpulocker.agent.reconcile import DB_ERRORS, Holding, Plan, Reconciler
from gpulocker.agent.steps import AgentStep, FunctionStep, HeartbeatStep, StepView
from gpulocker.config import Settings
from gpulocker.context import Context
from gpulocker.gpus import GpuBackend, GpuSample, make_backend
from gpulocker.inventory import TypedGpu

log = logging.getLogger(__name__)

POLL_SECONDS = 0.2  # how often the change counter is read and the reaper polled
SLACK_SECONDS = 0.05  # steps due this close together run in the same tick


def default_steps() -> list[AgentStep]:
    """The steps after the loop's own (sample, reconcile, reap), in the order a tick runs
    them. A new step: one file with its class, one line here."""
    from gpulocker.agent.violations import ViolationsStep
    from gpulocker.disk import DiskStep
    from gpulocker.history import HistoryStep
    from gpulocker.notify.linking import TelegramLinkStep
    from gpulocker.notify.outbox import OutboxStep
    from gpulocker.policies import PoliciesStep
    from gpulocker.retention import RetentionStep
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
        RetentionStep(),
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
        self.waker: wake.Waker | None = None  # set by run(): changes wake it (agent/wake.py)
        self.steps = steps if steps is not None else self.own_steps() + default_steps()
        self.registered = False
        self.started = False
        self.last_tick_ms = 0.0
        self.health = GpuHealth(ctx, self.host)
        self._due: dict[str, float] = {}
        self.token = wake.ChangeToken(ctx.db)
        self._seen_token: tuple[int, int, int] | None = None
        self._changes = 0  # how often the token moved
        self._hearing = False  # a wake thread keeps the token fresh (`change_count`)
        self._watching = False  # the watch thread hears the device files
        self._next_full = 0.0
        self.watch_restores = 0  # restores by the inotify watch (agent/watch.py)
        self.reconcile_lock = threading.RLock()  # the loop and the wake thread reconcile

    def own_steps(self) -> list[AgentStep]:
        """The loop's own steps: read the GPUs, reconcile when due, finish revokes."""
        return [
            FunctionStep("sample", lambda view: self.sample(), _sample_every),
            FunctionStep("reconcile", lambda view: self.reconcile_if_due(), self._check_every),
            FunctionStep("reap", lambda view: self.finish_revokes(), self._reap_every),
        ]

    def _check_every(self, settings: Settings) -> float:
        """The change check: a 5 s backstop while changes wake us and the watch hears the
        device files; the 0.2 s poll otherwise (a touched file is seen by its stat)."""
        return wake.backstop_seconds(settings) if self.waker and self._watching else POLL_SECONDS

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
        """First thing: put this host's GPUs in the inventory, restore the right access and
        say the agent is alive. True when a file had to be corrected."""
        self.started = True
        self.register()
        changed = self.reconcile()
        self._next_full = time.monotonic() + self.settings.reconcile_seconds
        self._run_step(HeartbeatStep())  # a request served from now on may wait for access
        return changed

    def tick(self, force: bool = False) -> dict[str, bool]:
        """Run every due step once (every step when `force`); returns step -> found work."""
        if not self.started:
            self._run_step(FunctionStep("start", lambda view: self.start(), _poll_every))
        began = time.monotonic()
        results = {}
        for step in self.steps:  # a step due within SLACK runs now: fewer, fuller wake-ups
            if not force and self._due.get(step.name, 0.0) > began + SLACK_SECONDS:
                continue
            results[step.name] = self._run_step(step)
            # From this tick's start, so steps of related periods stay in step.
            every, now = step.every(self.settings), time.monotonic()
            self._due[step.name] = began + every if began + every > now else now + every
        self.last_tick_ms = (time.monotonic() - began) * 1000
        return results

    def _run_step(self, step: AgentStep) -> bool:
        view: StepView = self
        try:
            return bool(step.run(view))
        except Exception:
            log.exception("agent step %s failed; the loop goes on", step.name)
            return False

    def run(self, stop: threading.Event, ready: Callable[[], None] | None = None) -> None:
        """Tick until `stop` is set (SIGTERM sets it in `gpulocker agent`). `ready` is called
        once the agent enforces (first reconcile and heartbeat done): the local socket."""
        log.info(
            "agent on %s: %d GPU(s) managed (%s)", self.host, len(self.gpus), self.backend.name
        )
        self.waker = wake.start(self)  # listening before the first reconcile: nothing missed
        threads: list[threading.Thread] = []
        try:
            if self.waker is not None:
                threads.append(wake.poke_on_stop(stop, self.waker))
            if not self.started:
                self._run_step(FunctionStep("start", lambda view: self.start(), _poll_every))
            if ready is not None:
                ready()
            watcher = watch.start_thread(self, stop)  # restores a changed device file at once
            if watcher is not None:
                threads.append(watcher)
                self._watching = True
            if self.waker is not None:
                threads.append(wake.start_thread(self, self.waker, stop))
                self._hearing = True
            while not stop.is_set():
                self.tick()
                stop.wait(self._sleep_seconds())
        finally:
            self._hearing = self._watching = False
            stop.set()
            for thread in threads:
                thread.join(timeout=5)
            self.close()
            log.info("agent on %s stopped", self.host)

    def _sleep_seconds(self) -> float:
        """Until the next step is due; at most the 0.2 s poll while nothing wakes us."""
        wait = self.seconds_to_next_step() if self._due else POLL_SECONDS
        return min(max(wait, 0.01), POLL_SECONDS if self.waker is None else 3600.0)

    def seconds_to_next_step(self) -> float:
        """How long until a step is due (for a sleep that a change may cut short)."""
        if not self._due:
            return 0.0
        return max(min(self._due.values()) - time.monotonic(), 0.0)

    def close(self) -> None:
        """Release the GPU backend. Processes still being ended are ended again after a
        restart (their allocations keep access_removed_at empty until then)."""
        if self.reaper.pending:
            log.info("stopping with %d process(es) still being ended", len(self.reaper.pending))
        if self.waker is not None:
            self.waker.close()
            self.waker = None
        with self.reconcile_lock:
            self.token.close()
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
        self.health.update(samples)
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

    # --- reconcile: when (here) and what (agent/reconcile.py)

    def reconcile_if_due(self) -> bool:
        """Reconcile when something changed in the database or on a device file, or when
        RECONCILE_SECONDS passed. What the watch's restores corrected is recorded first."""
        with self.reconcile_lock:
            self.reconciler.write_reports()
            now = time.monotonic()
            before = self._seen_token
            token = self.token.read()
            if token is not None and token != before:
                self._seen_token = token
                self._changes += 1
            moved = token is not None and (before is None or token[:2] != before[:2])
            if not moved and not self.reconciler.files_touched() and now < self._next_full:
                return False
            self._next_full = now + self.settings.reconcile_seconds
            return self.reconciler.reconcile()

    def on_change(self) -> bool:
        """A change may have been committed (the wake thread heard one): look, and reconcile
        if the database moved. True when it had."""
        with self.reconcile_lock:
            before = self._changes
            self.reconcile_if_due()
            return self._changes != before

    def change_count(self) -> int | None:
        """How often the database was seen to change (events, outbox), while a wake thread
        keeps this fresh; None when nobody does and a step must read the database itself."""
        return self._changes if self._hearing else None

    def restore(self, paths: set[str]) -> bool:
        """Device files changed (the watch thread): put them back at once from the plan the
        last reconcile applied, without the database (agent/reconcile.py says why that is
        safe); the wake thread records the drift. True when a file was rewritten."""
        self.watch_restores += 1
        if self.reconciled_at is None:  # no plan yet
            return self.reconcile()
        changed = self.reconciler.restore(paths)
        waker = self.waker
        if waker is not None:
            waker.wake()  # the drift events are written off this thread
        return changed

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
        args=(ctx, lambda ready: agent.run(stop, ready)),
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
    localapi.serve_while(ctx, lambda ready: agent.run(stop, ready))  # the socket, while it runs
