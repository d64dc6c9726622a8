"""The agent: the one privileged process of a GPU host. It makes the device files say what
the database says, ends the processes that may no longer run, and reports what it sees.

It is a loop of small steps (sample, reconcile, reap, violations, heartbeat, and the
policies other modules append in `default_steps`). Each step returns "did I find work?",
fails alone (an exception is logged and the loop goes on) and runs on its own period.

Reconcile is the heart: the desired state is the active allocations of this host; every
managed device file gets the fail-closed baseline plus exactly the holders' entries (and
the standing entries of exempt users, and of admins when PRIVILEGED_GPU_ACCESS). Whatever
else is found on a file is drift: it is undone and recorded as an event saying what was
changed. An allocation that ended loses its entry and its holder's processes on that GPU
are ended; only when they are gone is `access_removed_at` set, so a crash at any point is
repaired by the next reconcile, which is the first thing a (re)started agent does.

Reconcile runs every RECONCILE_SECONDS, and within the 0.2 s poll when the events table
changes (every grant and release records an event) or a device file's inode change time
moves (chmod, setfacl, a re-created file), so a grant reaches the file, and drift is
undone, well within a second, with or without Redis. When the database cannot be read
the agent keeps enforcing the last state it knew; it never revokes everyone because a
read failed.

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
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import SQLAlchemyError

from gpulocker import allocations, events, heartbeat, inventory, live, procfs
from gpulocker.agent import access, localapi
from gpulocker.config import Settings
from gpulocker.context import Context
from gpulocker.gpus import GpuBackend, GpuSample, make_backend
from gpulocker.inventory import TypedGpu
from gpulocker.models import ACTIVE, Allocation, Event, utcnow
from gpulocker.notify import notify

log = logging.getLogger(__name__)

POLL_SECONDS = 0.2  # how often the change counter is read and the reaper polled
HEARTBEAT_SECONDS = 5.0
EVENT_WINDOW = 64  # events that may still commit out of id order (see _change_token)
DB_ERRORS = (SQLAlchemyError, OSError)


@dataclass
class Step:
    """One small piece of the agent's work and how often it runs."""

    name: str
    run: Callable[[Agent], bool]  # returns "did I find work?"
    every: Callable[[Settings], float]  # seconds between runs


@dataclass(frozen=True)
class Holding:
    """An allocation as reconcile needs it (copied out of the session)."""

    allocation_id: int
    user: str
    gpu_id: int
    applied: bool


@dataclass(frozen=True)
class Plan:
    """The desired state read from the database: who holds what, what is being given up."""

    active: dict[int, list[Holding]]  # gpu_id -> active allocations
    ending: dict[int, list[Holding]]  # gpu_id -> ended allocations whose access is not removed


@dataclass
class Report:
    """What one reconcile did, to be written to the database in one transaction."""

    drift: list[tuple[str, int, str, list[str]]] = field(default_factory=list)
    applied: list[int] = field(default_factory=list)
    changed_files: int = 0
    revokes: int = 0


class Agent:
    """The loop of steps on one host. Tests call `tick()`; production calls `run(stop)`."""

    def __init__(
        self, ctx: Context, backend: GpuBackend | None = None, steps: list[Step] | None = None
    ) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self.host = self.settings.gpu_host
        self.backend = backend if backend is not None else make_backend(self.settings)
        self.gpus: list[TypedGpu] = inventory.assign_types(
            self.settings.gpu_config, self.backend.inventory()
        )
        self.samples: dict[int, GpuSample] = {}
        self.steps = steps if steps is not None else default_steps()
        self.reaper = access.Reaper(self.settings.kill_grace_seconds)
        self.plan: Plan | None = None
        self.revoking: dict[int, tuple[Holding, list[int]]] = {}  # allocation id -> pids ended
        self.punished: dict[int, float] = {}  # pid -> start time, of violators already handled
        self.db_ok = True
        self.registered = False
        self.started = False
        self.last_tick_ms = 0.0
        self.reconciled_at: str | None = None
        self._health: dict[int, tuple[bool, str | None]] = {}
        self._due: dict[str, float] = {}
        self._seen_token: tuple[int, int] | None = None
        self._event_floor = 0
        self._next_full = 0.0
        self._baselined: set[str] = set()
        self._fingerprints: dict[str, tuple[int, ...] | None] = {}
        self._unknown_users: set[str] = set()

    @property
    def devices(self) -> dict[int, str]:
        """Managed GPU index -> its device file."""
        return {g.info.index: g.info.device for g in self.gpus}

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
            self._run_step(Step("start", Agent.start, lambda s: 0.0))
        began = time.monotonic()
        results = {}
        for step in self.steps:
            if not force and self._due.get(step.name, 0.0) > began:
                continue
            results[step.name] = self._run_step(step)
            self._due[step.name] = time.monotonic() + step.every(self.settings)
        self.last_tick_ms = (time.monotonic() - began) * 1000
        return results

    def _run_step(self, step: Step) -> bool:
        try:
            return bool(step.run(self))
        except Exception:
            log.exception("agent step %s failed; the loop goes on", step.name)
            return False

    def run(self, stop: threading.Event) -> None:
        """Tick until `stop` is set (SIGTERM sets it in `gpulocker agent`)."""
        log.info(
            "agent on %s: %d GPU(s) managed (%s)", self.host, len(self.gpus), self.backend.name
        )
        try:
            while not stop.is_set():
                self.tick()
                stop.wait(self._sleep_seconds())
        finally:
            self.close()
            log.info("agent on %s stopped", self.host)

    def _sleep_seconds(self) -> float:
        if not self._due:
            return POLL_SECONDS
        wait = min(self._due.values()) - time.monotonic()
        return min(max(wait, 0.01), POLL_SECONDS)

    def close(self) -> None:
        """Release the GPU backend. Processes still being ended are ended again after a
        restart (their allocations keep access_removed_at empty until then)."""
        if self.reaper.pending:
            log.info("stopping with %d process(es) still being ended", len(self.reaper.pending))
        self.backend.close()

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

    # --- reconcile

    def reconcile_if_due(self) -> bool:
        """Reconcile when something changed in the database or on a device file, or when
        RECONCILE_SECONDS passed."""
        now = time.monotonic()
        token = self._change_token()
        changed = token is not None and token != self._seen_token
        if not changed and not self._files_touched() and now < self._next_full:
            return False
        if token is not None:
            self._seen_token = token
        self._next_full = now + self.settings.reconcile_seconds
        return self.reconcile()

    def _files_touched(self) -> bool:
        """True when a device file changed since the last reconcile left it: a chmod, a
        setfacl or a re-created file all change its inode change time. One stat per file,
        so drift is undone within the 0.2 s poll rather than RECONCILE_SECONDS."""
        return any(_fingerprint(path) != seen for path, seen in self._fingerprints.items())

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
        """Make every managed device file say what the database says. True if it changed
        a file or started a revoke."""
        plan = self.read_plan()
        if plan is not None:
            self.plan = plan
        report = Report()
        standing = self.standing_uids()
        for gpu in self.gpus:
            try:
                self._reconcile_gpu(gpu, self.plan, standing, report)
            except Exception:
                log.exception("reconcile of GPU %s failed; the others go on", gpu.info.index)
                # Retried every RECONCILE_SECONDS, not at every poll.
                self._fingerprints[gpu.info.device] = _fingerprint(gpu.info.device)
        self._write_report(report)
        self.finish_revokes()
        self.reconciled_at = utcnow().isoformat()
        return bool(report.changed_files or report.revokes or report.applied)

    def read_plan(self) -> Plan | None:
        """The desired state, or None when the database cannot be read."""
        try:
            with self.ctx.db.session() as session:
                active = allocations.active_on_host(session, self.host)
                ending = session.scalars(
                    select(Allocation).where(
                        Allocation.host == self.host,
                        Allocation.state != ACTIVE,
                        Allocation.access_removed_at.is_(None),
                    )
                ).all()
                plan = Plan(_by_gpu(active), _by_gpu(ending))
        except DB_ERRORS as exc:
            if self.db_ok:
                log.error("database unreachable; keeping the last known access state: %s", exc)
            self.db_ok = False
            return None
        if not self.db_ok:
            log.info("database reachable again")
        self.db_ok = True
        return plan

    def standing_uids(self) -> set[int]:
        """Users who may always open every managed GPU: the exempt users (nvidia-persistenced
        needs every device file) and admins when PRIVILEGED_GPU_ACCESS. Root needs no entry."""
        names = list(self.settings.exempt_users)
        if self.settings.privileged_gpu_access:
            names += list(self.settings.privileged_users)
        uids = {access.user_uid(n) for n in names}
        return {u for u in uids if u is not None and u != 0}

    def _reconcile_gpu(
        self, gpu: TypedGpu, plan: Plan | None, standing: set[int], report: Report
    ) -> None:
        index, path = gpu.info.index, gpu.info.device
        try:
            current = access.read(path)
        except FileNotFoundError:
            log.warning("device file %s of GPU %s is missing; nothing to enforce", path, index)
            self._fingerprints[path] = None  # its return is a change: reconciled at once
            return
        if plan is None:  # never read the database: close the file to strangers, revoke no one
            holders: dict[int, Holding] = {}
            want = set(current.users) | standing
        else:
            holders = self._holder_uids(plan.active.get(index, []))
            want = set(holders) | standing
        ending = [] if plan is None else plan.ending.get(index, [])
        ending_uids = {access.user_uid(h.user) for h in ending} - want
        drift = self._drift(current, want, holders, ending_uids)
        if not access.compliant(current, want):
            access.apply(path, want)
            report.changed_files += 1
        if drift:
            first = path not in self._baselined and "mask::missing -> rw-" in drift
            report.drift.append(("baseline" if first else "drift", index, path, drift))
        self._baselined.add(path)
        self._fingerprints[path] = _fingerprint(path)
        report.applied += [h.allocation_id for h in holders.values() if not h.applied]
        for holding in ending:
            report.revokes += self._start_revoke(holding, path, want)

    def _holder_uids(self, holdings: list[Holding]) -> dict[int, Holding]:
        found = {}
        for holding in holdings:
            uid = access.user_uid(holding.user)
            if uid is None:
                if holding.user not in self._unknown_users:
                    log.error(
                        "allocation %s: no account %r here", holding.allocation_id, holding.user
                    )
                    self._unknown_users.add(holding.user)
                continue
            found[uid] = holding
        return found

    @staticmethod
    def _drift(
        current: access.FileAccess,
        want: set[int],
        holders: dict[int, Holding],
        ending_uids: set[int | None],
    ) -> list[str]:
        """What on the file nobody asked for (grants and revokes in progress are not drift)."""
        drift = access.baseline_problems(current)
        if drift:
            drift.insert(0, f"mode {current.mode_text}")
        for uid, perms in sorted(current.users.items()):
            name = access.user_label(uid)
            if uid in want and perms != access.RW:
                drift.append(f"user:{name}:{perms} -> rw-")
            elif uid not in want and uid not in ending_uids:
                drift.append(f"removed user:{name}:{perms}")
        for uid in sorted(want - set(current.users)):
            if uid in holders and holders[uid].applied:
                drift.append(f"restored missing user:{access.user_label(uid)}:rw-")
        return drift

    def _start_revoke(self, holding: Holding, path: str, want: set[int]) -> bool:
        """End the former holder's processes on this GPU (their entry is already gone).
        False when this revoke is already under way."""
        if holding.allocation_id in self.revoking:
            return False
        uid = access.user_uid(holding.user)
        pids: list[int] = []
        if uid is not None and uid not in want:
            held = procfs.holders([path]).get(path, [])
            pids = self.reaper.terminate(h.pid for h in held if h.uid == uid)
            if pids:
                log.info("revoke of allocation %s: SIGTERM to %s", holding.allocation_id, pids)
        self.revoking[holding.allocation_id] = (holding, pids)
        return True

    def finish_revokes(self) -> bool:
        """Set access_removed_at for revokes whose processes are all gone."""
        self.reaper.poll()
        done = [(h, p) for h, p in self.revoking.values() if not self.reaper.busy(p)]
        if not done:
            return False
        try:
            with self.ctx.db.transaction() as session:
                for holding, pids in done:
                    self._mark_removed(session, holding, pids)
        except DB_ERRORS as exc:
            log.error("cannot record removed access (will retry): %s", exc)
            return False
        for holding, _pids in done:
            del self.revoking[holding.allocation_id]
        return True

    def _mark_removed(self, session: Any, holding: Holding, pids: list[int]) -> None:
        result = session.execute(
            update(Allocation)
            .where(Allocation.id == holding.allocation_id, Allocation.access_removed_at.is_(None))
            .values(access_removed_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        if not result.rowcount:
            return
        ended = f"; ended process(es) {', '.join(map(str, pids))}" if pids else ""
        events.record(
            session,
            "access_removed",
            "agent",
            f"access of {holding.user} to GPU {holding.gpu_id} on {self.host} removed{ended}",
            user=holding.user,
            host=self.host,
            gpu_id=holding.gpu_id,
            allocation_id=holding.allocation_id,
            data={"pids": pids},
        )

    def _write_report(self, report: Report) -> None:
        for kind, index, path, changes in report.drift:
            log.warning("%s on %s (GPU %s): %s", kind, path, index, "; ".join(changes))
        if not report.drift and not report.applied:
            return
        try:
            with self.ctx.db.transaction() as session:
                for kind, index, path, changes in report.drift:
                    events.record(
                        session,
                        kind,
                        "agent",
                        f"{path} (GPU {index}) corrected: {'; '.join(changes)}",
                        host=self.host,
                        gpu_id=index,
                        data={"device": path, "changes": changes},
                    )
                for allocation_id in report.applied:
                    allocations.mark_access_applied(session, allocation_id)
        except DB_ERRORS as exc:
            log.error("cannot record what reconcile did (the files are right): %s", exc)

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
        }


def _fingerprint(path: str) -> tuple[int, ...] | None:
    """What changes when anyone touches a file's permissions (None: the file is missing)."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_ino, info.st_mode, info.st_uid, info.st_gid, info.st_ctime_ns


def _by_gpu(rows: Any) -> dict[int, list[Holding]]:
    grouped: dict[int, list[Holding]] = {}
    for row in rows:
        holding = Holding(row.id, row.user, row.gpu_id, row.access_applied_at is not None)
        grouped.setdefault(row.gpu_id, []).append(holding)
    return grouped


# --- the steps


def sample_step(agent: Agent) -> bool:
    """Read every GPU, publish the readings for the web side, record health changes."""
    if not agent.registered:
        agent.register()
    managed = agent.devices
    samples = [s for s in agent.backend.sample() if s.index in managed]
    agent.samples = {s.index: s for s in samples}
    live.publish(agent.ctx, agent.host, samples)
    agent.update_health(samples)
    return bool(samples)


def reconcile_step(agent: Agent) -> bool:
    """Reconcile when the database changed, or every RECONCILE_SECONDS."""
    return agent.reconcile_if_due()


def reap_step(agent: Agent) -> bool:
    """SIGKILL what outlived its grace; finish revokes whose processes are gone."""
    return agent.finish_revokes()


def heartbeat_step(agent: Agent) -> bool:
    """Tell the web side this agent is alive, with what it last did."""
    with agent.ctx.db.transaction() as session:
        heartbeat.beat(session, heartbeat.agent_name(agent.host), agent.status())
    return False


def default_steps() -> list[Step]:
    """The agent's steps, in the order each tick runs them."""
    from gpulocker import disk, history, policies
    from gpulocker.agent import violations
    from gpulocker.notify import linking, outbox

    return [
        Step("sample", sample_step, lambda s: s.gpus_status_refresh_rate_seconds),
        Step("reconcile", reconcile_step, lambda s: POLL_SECONDS),
        Step("reap", reap_step, lambda s: POLL_SECONDS),
        Step("violations", violations.check, lambda s: s.gpus_status_refresh_rate_seconds),
        Step("heartbeat", heartbeat_step, lambda s: HEARTBEAT_SECONDS),
        Step("history", history.history_step, history.history_every),
        Step("policies", policies.policies_step, policies.policies_every),
        Step("outbox", outbox.outbox_step, outbox.outbox_every),
        Step("telegram", linking.updates_step, linking.updates_every),
        Step("disk", disk.disk_step, disk.disk_every),
    ]


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
