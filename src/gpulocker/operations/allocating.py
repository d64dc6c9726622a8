"""The allocation operations a user runs: who am I, the status, request, list, get,
extend, release, release all (see gpulocker.operations for the table)."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import select

from gpulocker import allocations, gpustatus, heartbeat, lockouts, scheduling_ops
from gpulocker import schemas as s
from gpulocker.context import Context
from gpulocker.errors import NotFound
from gpulocker.models import Allocation

ACCESS_WAIT_SECONDS = 2.0  # how long a request waits for the agent to grant access on the files


def me(ctx: Context, actor: str, _args: s.NoArgs) -> dict[str, Any]:
    """Who the caller is, and (SPEC section 11) their usage, quota limits and fair share:
    the same numbers as `me.usage`, from the same function."""
    with ctx.db.session() as session:
        lockout = lockouts.active(session, actor)
    return {
        "username": actor,
        "is_admin": ctx.settings.is_admin(actor),
        "locked_until": lockout.until.isoformat() if lockout else None,
        **scheduling_ops.me(ctx, actor),
    }


def status(ctx: Context, actor: str, _args: s.NoArgs) -> dict[str, Any]:
    return gpustatus.snapshot(ctx, with_users=True)


def request(ctx: Context, actor: str, args: s.AllocationRequest) -> dict[str, Any]:
    """Take GPUs now; with `wait`, wait in line when too few are free: the answer is then
    `{"request": ...}` (HTTP 202), granted later by the scheduler."""
    rows, waiting = scheduling_ops.take(
        ctx,
        actor,
        args.gpu_type,
        args.count,
        args.hours,
        args.wait,
        args.wait_hours,
        args.gpu_ids,
        args.user,
    )
    if waiting is not None:
        return {"request": waiting}
    with ctx.db.session() as session:
        alive = heartbeat.agents_alive(session, ctx.settings, [r.host for r in rows])
    if alive:
        rows = wait_for_access(ctx, [r.id for r in rows])
    applied = all(r.access_applied_at is not None for r in rows)
    return {
        "allocations": [r.to_dict() for r in rows],
        "cuda_visible_devices": allocations.cuda_visible_devices(ctx.db, rows),
        "access": "applied" if applied else "pending",
        "agent": "running" if alive else "not running",
    }


def wait_for_access(
    ctx: Context, ids: list[int], timeout: float = ACCESS_WAIT_SECONDS
) -> list[Allocation]:
    """The allocations, re-read until the agent marked access applied or `timeout` passed."""
    deadline = time.monotonic() + timeout
    while True:
        with ctx.db.session() as session:
            rows = list(session.scalars(select(Allocation).where(Allocation.id.in_(ids))))
        if all(r.access_applied_at for r in rows) or time.monotonic() >= deadline:
            return sorted(rows, key=lambda r: r.gpu_id)
        time.sleep(0.05)


def list_for(ctx: Context, actor: str, args: s.AllocationListRequest) -> dict[str, Any]:
    wanted = None if args.state == "any" else args.state
    with ctx.db.session() as session:
        rows = allocations.list_for(session, ctx.settings, actor, all_users=args.all, state=wanted)
        return {"allocations": [r.to_dict() for r in rows]}


def _known(allocation_id: int) -> int:
    """An id the database could not hold is simply not found (as over HTTP's path)."""
    if not 0 <= allocation_id <= s.MAX_ID:
        raise NotFound(f"no such allocation: {allocation_id}")
    return allocation_id


def get(ctx: Context, actor: str, args: s.AllocationRef) -> dict[str, Any]:
    with ctx.db.session() as session:
        row = allocations.get(session, ctx.settings, actor, _known(args.id))
        return {"allocation": row.to_dict()}


def extend(ctx: Context, actor: str, args: s.ExtendArgs) -> dict[str, Any]:
    row = allocations.extend(ctx.db, ctx.settings, actor, _known(args.id), args.hours)
    return {"allocation": row.to_dict()}


def release(ctx: Context, actor: str, args: s.AllocationRef) -> dict[str, Any]:
    row = allocations.release(ctx.db, ctx.settings, actor, _known(args.id))
    return {"allocation": row.to_dict()}


def release_all(ctx: Context, actor: str, args: s.ReleaseAllRequest) -> dict[str, Any]:
    return {"released": allocations.release_all(ctx.db, ctx.settings, actor, args.user)}
