"""Reconcile: make every managed device file say what the database says.

The desired state is the active allocations of this host; every managed device file gets
the fail-closed baseline plus exactly the holders' entries (and the standing entries of
exempt users, and of admins when PRIVILEGED_GPU_ACCESS). Whatever else is found on a file
is drift: it is undone and recorded as an event saying what was changed. An allocation
that ended loses its entry and its holder's processes on that GPU are ended; only when
they are gone is `access_removed_at` set, so a crash at any point is repaired by the next
reconcile, which is the first thing a (re)started agent does. When the database cannot be
read the last known state is kept; nobody is revoked because a read failed.

When to reconcile (database changes, touched files, RECONCILE_SECONDS) is the loop's
business (`agent/loop.py`); `files_touched()` is what it asks this module.

`restore(paths)` is the watch thread's (`agent/watch.py`): a device file changed behind the
agent's back, and it is put back at once to the plan the last reconcile applied, without
reading the database. That plan is never more open than the files should be: a change
in the database reaches the files only through a reconcile, which replaces the plan and
rewrites the files under the same `files_lock`, so the plan in memory is exactly what the
agent last wrote. A revoke committed but not yet reconciled is still on the file too
(restoring cannot re-open anything already closed), and the reconcile its commit wakes
closes it. Reconciles themselves must not overlap (the agent's `reconcile_lock`).
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import SQLAlchemyError

from gpulocker import allocations, events
from gpulocker.agent import access
from gpulocker.agent import holders as gpu_holders
from gpulocker.agent.drift import DriftLimiter
from gpulocker.context import Context
from gpulocker.inventory import TypedGpu
from gpulocker.models import ACTIVE, Allocation, utcnow

log = logging.getLogger(__name__)

DB_ERRORS = (SQLAlchemyError, OSError)


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

    def with_applied(self, ids: set[int]) -> Plan:
        """This plan once the allocations `ids` are on the files (for restores: a missing
        entry of theirs is drift)."""
        active = {
            gpu: [replace(h, applied=True) if h.allocation_id in ids else h for h in held]
            for gpu, held in self.active.items()
        }
        return Plan(active, self.ending)


@dataclass
class Report:
    """What one reconcile did, to be written to the database in one transaction."""

    drift: list[tuple[str, int, str, list[str]]] = field(default_factory=list)
    applied: list[int] = field(default_factory=list)
    changed_files: int = 0
    revokes: int = 0


class Reconciler:
    """The desired state of one host's device files, and the revokes under way."""

    def __init__(
        self, ctx: Context, host: str, gpus: list[TypedGpu], reaper: access.Reaper
    ) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self.host = host
        self.gpus = gpus
        self.reaper = reaper
        self.plan: Plan | None = None
        self.revoking: dict[int, tuple[Holding, list[int]]] = {}  # allocation id -> pids ended
        self.db_ok = True
        self.reconciled_at: str | None = None
        self._baselined: set[str] = set()
        self.drift_limiter = DriftLimiter()
        self._fingerprints: dict[str, tuple[int, ...] | None] = {}
        self._unknown_users: set[str] = set()
        self._standing: set[int] = set()  # standing_uids() at the last reconcile
        # Held while the plan is replaced and the files written, and by `restore`: short
        # (no database, no process sweep), so the watch never waits behind a revoke.
        self.files_lock = threading.Lock()
        self._unwritten: list[Report] = []  # what restores did, for the next write

    def files_touched(self) -> bool:
        """True when a device file changed since the last reconcile left it: a chmod, a
        setfacl or a re-created file all change its inode change time. One stat per file,
        so drift is undone within the 0.2 s poll rather than RECONCILE_SECONDS."""
        seen = list(self._fingerprints.items())  # the watch thread may add one meanwhile
        return any(_fingerprint(path) != last for path, last in seen)

    def reconcile(self) -> bool:
        """Make every managed device file say what the database says. True if it changed
        a file or started a revoke."""
        plan = self.read_plan()
        standing = self.standing_uids()
        report = Report()
        revokes: list[tuple[Holding, str, set[int]]] = []
        with self.files_lock:
            if plan is not None:
                self.plan = plan
            self._standing = standing
            for gpu in self.gpus:
                self._reconcile_one(gpu, report, revokes)
            if self.plan is not None and report.applied:  # on the files now
                self.plan = self.plan.with_applied(set(report.applied))
        for holding, path, want in revokes:  # the entry is gone: now end the processes
            report.revokes += self._start_revoke(holding, path, want)
        self.write_reports(report)
        self.finish_revokes()
        self.reconciled_at = utcnow().isoformat()
        return bool(report.changed_files or report.revokes or report.applied)

    def restore(self, paths: set[str]) -> bool:
        """Put the changed device files among `paths` back to the plan the last reconcile
        applied, at once and without the database (see the module docstring). What was
        corrected is recorded by the next `write_reports`. True when a file was rewritten.
        Before the first reconcile (no plan) it does what a reconcile without the database
        does: close the file to strangers, keep the named entries."""
        report = Report()
        with self.files_lock:
            for gpu in self.gpus:
                if gpu.info.device in paths:
                    self._reconcile_one(gpu, report, None)
            report.applied.clear()  # the reconcile that read the plan marks those
            self._unwritten.append(report)
        return bool(report.changed_files)

    def _reconcile_one(
        self, gpu: TypedGpu, report: Report, revokes: list[tuple[Holding, str, set[int]]] | None
    ) -> None:
        try:
            self._reconcile_gpu(gpu, self.plan, self._standing, report, revokes)
        except Exception:
            log.exception("reconcile of GPU %s failed; the others go on", gpu.info.index)
            # Retried every RECONCILE_SECONDS, not at every poll.
            self._fingerprints[gpu.info.device] = _fingerprint(gpu.info.device)

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
        self,
        gpu: TypedGpu,
        plan: Plan | None,
        standing: set[int],
        report: Report,
        revokes: list[tuple[Holding, str, set[int]]] | None,
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
        if revokes is not None:
            revokes += [(holding, path, want) for holding in ending]

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
            pids = self.reaper.terminate(gpu_holders.holding(path, uid))  # by what they hold
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

    def write_reports(self, report: Report | None = None) -> None:
        """Record `report` and what restores did since the last call (one transaction)."""
        with self.files_lock:
            reports, self._unwritten = self._unwritten, []
        if report is not None:
            reports.append(report)
        merged = Report()
        by_file: dict[tuple[str, int, str], list[str]] = {}
        for each in reports:  # several restores of one file: one record of every change
            for kind, index, path, changes in each.drift:
                listed = by_file.setdefault((kind, index, path), [])
                listed += [c for c in changes if c not in listed]
            merged.applied += each.applied
        merged.drift = [(kind, index, path, c) for (kind, index, path), c in by_file.items()]
        self._write_report(merged)

    def _write_report(self, report: Report) -> None:
        # At most one record per file and kind of change per minute (a chmod loop is one
        # kind; someone's setfacl another, recorded in its own right); every correction is
        # done anyway.
        drift = []
        for kind, index, path, changes in report.drift:
            coalesced = self.drift_limiter.admit(f"{kind} {path}: {'; '.join(changes)}")
            if coalesced is not None:
                log.warning("%s on %s (GPU %s): %s", kind, path, index, "; ".join(changes))
                drift.append((kind, index, path, changes, coalesced))
        if not drift and not report.applied:
            return
        try:
            with self.ctx.db.transaction() as session:
                for kind, index, path, changes, coalesced in drift:
                    more = f" (and {coalesced} more times before)" if coalesced else ""
                    events.record(
                        session,
                        kind,
                        "agent",
                        f"{path} (GPU {index}) corrected{more}: {'; '.join(changes)}",
                        host=self.host,
                        gpu_id=index,
                        data={"device": path, "changes": changes, "coalesced": coalesced},
                    )
                for allocation_id in report.applied:
                    allocations.mark_access_applied(session, allocation_id)
        except DB_ERRORS as exc:
            log.error("cannot record what reconcile did (the files are right): %s", exc)


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
