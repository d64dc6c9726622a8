"""Violations: a process on a managed GPU whose owner may not use that GPU.

May use it: the holder of its active allocation, a former holder whose access is still
being removed (their processes are already being ended by the revoke), the exempt users
(EXEMPT_USERS), and admins when PRIVILEGED_GPU_ACCESS. Anyone else is a violator: the
event is recorded, their processes are ended (KILL_VIOLATORS), they are locked out for
USER_LOCKOUT_HOURS and they and the admins are told. A process is punished once.

The processes are the sample's, which `agent.holders` made from the backend's lists and
the descriptor sweep (a process that only holds the device file open is one). Violators
get SIGKILL at once; IGNORED_PROCESSES matches are never suspects.

When the database cannot be read nothing is punished: not knowing who holds a GPU is
never a reason to kill.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass

import psutil
from sqlalchemy import select
from sqlalchemy.orm import Session

from gpulocker import events, lockouts, procfs
from gpulocker.agent import access
from gpulocker.agent.steps import StepView
from gpulocker.config import Settings
from gpulocker.gpus import GpuSample
from gpulocker.models import Allocation
from gpulocker.notify import notify

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Suspect:
    """A process seen on a GPU its owner may not use."""

    gpu_id: int
    pid: int
    uid: int | None
    user: str
    name: str


def allowed_users(session: Session, host: str) -> dict[int, set[str]]:
    """Per GPU of `host`: its holder, and former holders whose access is still being removed.

    Both are the allocations whose access_removed_at is empty (the agent sets it only once an
    ended allocation's processes are gone), which an index finds without reading history.
    """
    stmt = select(Allocation.gpu_id, Allocation.user).where(
        Allocation.host == host, Allocation.access_removed_at.is_(None)
    )
    allowed: dict[int, set[str]] = defaultdict(set)
    for gpu_id, user in session.execute(stmt):
        allowed[gpu_id].add(user)
    return allowed


def exempt(settings: Settings) -> set[str]:
    """Users whose processes are never violations."""
    users = set(settings.exempt_users)
    if settings.privileged_gpu_access:
        users |= set(settings.privileged_users)
    return users


def suspects(
    samples: dict[int, GpuSample], allowed: dict[int, set[str]], exempt_users: set[str]
) -> list[Suspect]:
    """Processes in `samples` whose owner may not use that GPU."""
    found = []
    for gpu_id, sample in sorted(samples.items()):
        names = allowed.get(gpu_id, set()) | exempt_users
        uids = {uid for uid in map(access.user_uid, names) if uid is not None}
        for proc in sample.processes:
            if proc.ignored:  # IGNORED_PROCESSES: never a violator (SPEC 13)
                continue
            if proc.user in names or (proc.uid is not None and proc.uid in uids):
                continue
            if proc.uid is not None and procfs.known_name(proc.uid) is None:
                # Identity by uid: who it is cannot be told right now (no passwd entry, or
                # an NSS outage). Never punish on that; the ACL still keeps them out.
                log.warning(
                    "GPU %s: pid %s of uid %s whose name cannot be looked up; not punished",
                    gpu_id,
                    proc.pid,
                    proc.uid,
                )
                continue
            found.append(Suspect(gpu_id, proc.pid, proc.uid, proc.user, proc.name))
    return found


def record(
    session: Session, settings: Settings, host: str, user: str, found: list[Suspect], killed: bool
) -> None:
    """The event per GPU, the lockout, and the message to the owner and the admins."""
    gpus = sorted({s.gpu_id for s in found})
    for gpu_id in gpus:
        pids = [s.pid for s in found if s.gpu_id == gpu_id]
        names = sorted({s.name for s in found if s.gpu_id == gpu_id and s.name})
        events.record(
            session,
            "violation",
            "agent",
            f"{user} used GPU {gpu_id} on {host} without holding it "
            f"(pid {', '.join(map(str, pids))}){'; killed' if killed else ''}",
            user=user,
            host=host,
            gpu_id=gpu_id,
            data={"pids": pids, "names": names, "killed": killed},
        )
    gpu_text = ", ".join(map(str, gpus))
    until = lockouts.lock_out(
        session, settings, user, f"used GPU(s) {gpu_text} on {host} without an allocation"
    )
    done = "Your processes there were ended. " if killed else ""
    notify(
        session,
        settings,
        "violation",
        f"{user} used GPU(s) {gpu_text} on {host} without an allocation. {done}"
        f"{user} may not allocate until {until:%Y-%m-%d %H:%M} UTC.",
        users=[user],
        admins=True,
    )


class ViolationsStep:
    """Agent step: find violators in the newest samples and deal with each once. Owns the
    processes already punished (pid -> start time), so a process is punished once."""

    name = "violations"

    def __init__(self) -> None:
        self.punished: dict[int, float] = {}

    def every(self, settings: Settings) -> float:
        return settings.gpus_status_refresh_rate_seconds

    def run(self, view: StepView) -> bool:
        _forget_gone(self.punished)
        if not any(not p.ignored for s in view.samples.values() for p in s.processes):
            return False  # nobody on any GPU: nothing to ask the database about
        with view.ctx.db.session() as session:
            allowed = allowed_users(session, view.host)
        fresh = [
            s
            for s in suspects(view.samples, allowed, exempt(view.settings))
            if _new_and_alive(s, self.punished)
        ]
        by_user: dict[str, list[Suspect]] = defaultdict(list)
        for suspect in fresh:
            by_user[suspect.user].append(suspect)
        for user, found in by_user.items():
            self._punish(view, user, found)
        return bool(by_user)

    def _punish(self, view: StepView, user: str, found: list[Suspect]) -> None:
        killed = view.settings.kill_violators
        pids = [s.pid for s in found]
        log.warning("violation by %s on %s: pids %s", user, view.host, pids)
        if killed:
            view.reaper.kill(pids)  # at once: a violator gets no grace (SPEC 13)
        with view.ctx.db.transaction() as session:
            record(session, view.settings, view.host, user, found, killed)
        for suspect in found:
            self.punished[suspect.pid] = _start_time(suspect.pid) or 0.0


def _new_and_alive(suspect: Suspect, punished: dict[int, float]) -> bool:
    """Still running as the same owner (samples can be a second old) and not yet punished."""
    try:
        process = psutil.Process(suspect.pid)
        if suspect.uid is not None and process.uids().real != suspect.uid:
            return False
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        started = process.create_time()
    except psutil.NoSuchProcess:
        return False
    return punished.get(suspect.pid) != started


def _start_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return None


def _forget_gone(punished: dict[int, float]) -> None:
    for pid, started in list(punished.items()):
        if _start_time(pid) != started:
            del punished[pid]
