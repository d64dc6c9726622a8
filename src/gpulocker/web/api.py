"""The JSON API (SPEC section 7): thin views over the core.

Each view parses (through `endpoint`), calls the core, and returns a dict; the core's
refusals become 4xx answers in `gpulocker.web.errors`. A user only ever sees their own
allocations, tokens and notifications: the core functions take the actor and refuse
(NotFound) anything that is not theirs, unless the actor is an admin.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from flask import Blueprint, Response, current_app
from sqlalchemy import select

from gpulocker import (
    allocations,
    auth,
    events,
    heartbeat,
    history,
    inbox,
    inventory,
    lockouts,
    maintenance,
    tokens,
)
from gpulocker.errors import Forbidden, Invalid, NotFound
from gpulocker.models import Allocation, Gpu
from gpulocker.notify import admin_message
from gpulocker.web import schemas as s
from gpulocker.web.errors import Unauthorized
from gpulocker.web.openapi import document, endpoint
from gpulocker.web.session import (
    client_address,
    current_user,
    forget_tokens,
    get_ctx,
    is_admin,
)
from gpulocker.web.status_cache import STATUS_CACHE, StatusCache

bp = Blueprint("api", __name__, url_prefix="/api")

ACCESS_WAIT_SECONDS = 2.0
AGENT_ALIVE_SECONDS = 30.0


def me() -> str:
    """The signed-in user (the endpoint declaration already refused anonymous callers)."""
    user = current_user()
    if user is None:
        raise Unauthorized("sign in first")
    return user


# --- status -----------------------------------------------------------------------------


@endpoint(
    bp,
    "GET",
    "/gpu_status",
    auth="optional",
    response=s.GpuStatus,
    errors=(401,),
    summary="Every GPU with its live sample, holder, expiry and processes (the original "
    "endpoint). Anonymous callers get the metrics only, when PUBLIC_GPU_STATUS.",
)
def gpu_status() -> Response:
    ctx = get_ctx()
    signed_in = current_user() is not None
    if not signed_in and not ctx.settings.public_gpu_status:
        raise Unauthorized("sign in to see the GPU status")
    return _status_response(signed_in)


@endpoint(bp, "GET", "/v1/gpus", response=s.GpuStatus, summary="The GPU inventory with status")
def gpus() -> Response:
    return _status_response(with_users=True)


def _status_response(with_users: bool) -> Response:
    """The (cached) status as JSON; never stored by a shared cache, since holders are names."""
    cache: StatusCache = current_app.extensions[STATUS_CACHE]
    body = cache.body(get_ctx(), with_users)
    return Response(body, mimetype="application/json", headers={"Cache-Control": "no-store"})


@endpoint(
    bp,
    "GET",
    "/v1/gpus/<int:gpu_id>/history",
    query=s.HistoryQuery,
    response=s.History,
    summary="Utilization and memory of one GPU over the last `hours` (at most 1000 points)",
)
def gpu_history(gpu_id: int, query: s.HistoryQuery) -> dict[str, Any]:
    ctx = get_ctx()
    with ctx.db.session() as session:
        gpu = _find_gpu(session, gpu_id, query.host or ctx.settings.gpu_host)
        points = history.series(session, gpu.host, gpu.gpu_id, query.hours)
    return {"host": gpu.host, "gpu_id": gpu.gpu_id, "hours": query.hours, "points": points}


def _find_gpu(session: Any, gpu_id: int, host: str) -> Gpu:
    """The GPU `gpu_id` of `host`, or of the only host that has one with that id."""
    found = [g for g in inventory.all_gpus(session) if g.gpu_id == gpu_id]
    exact = [g for g in found if g.host == host]
    if exact:
        return exact[0]
    if len(found) == 1:
        return found[0]
    raise NotFound(f"no GPU {gpu_id}" + (f" on {host}" if host else ""))


# --- sign-in and tokens -----------------------------------------------------------------


@endpoint(
    bp,
    "POST",
    "/v1/tokens",
    auth="public",
    status=201,
    body=s.TokenRequest,
    response=s.TokenCreated,
    errors=(401, 429),
    summary="Sign in with your Linux account (PAM) and get a bearer token",
)
def create_token(body: s.TokenRequest) -> dict[str, Any]:
    ctx = get_ctx()
    user = auth.authenticate(ctx, body.username, body.password, client_address())
    name = body.name or f"API token from {client_address()}"
    row, raw = tokens.create(ctx.db, user, name, token_days=ctx.settings.token_days)
    return {"token": raw, "id": row.id, "username": user}


@endpoint(bp, "GET", "/v1/tokens", response=s.TokenList, summary="Your API tokens")
def list_tokens() -> dict[str, Any]:
    with get_ctx().db.session() as session:
        rows = tokens.list_for(session, me())
    return {"tokens": [tokens.to_dict(r) for r in rows]}


@endpoint(
    bp, "DELETE", "/v1/tokens/<int:token_id>", response=s.Ok, summary="Revoke one of your tokens"
)
def revoke_token(token_id: int) -> dict[str, Any]:
    tokens.revoke(get_ctx().db, me(), token_id)
    forget_tokens()
    return {"ok": True}


@endpoint(bp, "GET", "/v1/me", response=s.Me, summary="Who you are")
def who_am_i() -> dict[str, Any]:
    ctx = get_ctx()
    user = me()
    with ctx.db.session() as session:
        lockout = lockouts.active(session, user)
    return {
        "username": user,
        "is_admin": ctx.settings.is_admin(user),
        "locked_until": lockout.until.isoformat() if lockout else None,
    }


# --- allocations ------------------------------------------------------------------------


@endpoint(
    bp,
    "GET",
    "/v1/allocations",
    query=s.AllocationQuery,
    response=s.AllocationList,
    summary="Your allocations (admins with all=1: everyone's); active ones unless `state`",
)
def list_allocations(query: s.AllocationQuery) -> dict[str, Any]:
    ctx = get_ctx()
    with ctx.db.session() as session:
        rows = allocations.list_for(
            session, ctx.settings, me(), all_users=query.all, state=query.state or "active"
        )
    return {"allocations": [r.to_dict() for r in rows]}


@endpoint(
    bp,
    "POST",
    "/v1/allocations",
    status=201,
    body=s.AllocationRequest,
    response=s.AllocationGranted,
    errors=(409,),
    summary="Take GPUs of a type for a time, all or nothing. Answers once the device "
    "files let you in (at most ~2 s) when the agent runs.",
)
def request_allocation(body: s.AllocationRequest) -> dict[str, Any]:
    ctx = get_ctx()
    rows = allocations.request(
        ctx.db, ctx.settings, me(), body.gpu_type, body.count, body.hours, body.gpu_ids, body.user
    )
    ids = [r.id for r in rows]
    agent_alive = _agents_alive([r.host for r in rows])
    if agent_alive:
        rows = _wait_for_access(ids, ACCESS_WAIT_SECONDS)
    applied = all(r.access_applied_at is not None for r in rows)
    return {
        "allocations": [r.to_dict() for r in rows],
        "cuda_visible_devices": allocations.cuda_visible_devices(get_ctx().db, rows),
        "access": "applied" if applied else "pending",
        "agent": "running" if agent_alive else "not running",
    }


def _agents_alive(hosts: list[str]) -> bool:
    """Whether the agent of every host beat recently (else waiting would be pointless)."""
    ctx = get_ctx()
    limit = max(AGENT_ALIVE_SECONDS, 3 * ctx.settings.reconcile_seconds)
    with ctx.db.session() as session:
        for host in set(hosts):
            age = heartbeat.age_seconds(session, heartbeat.agent_name(host))
            if age is None or age > limit:
                return False
    return True


def _wait_for_access(ids: list[int], timeout: float) -> list[Allocation]:
    """The allocations, re-read until the agent marked access applied or `timeout` passed."""
    deadline = time.monotonic() + timeout
    while True:
        with get_ctx().db.session() as session:
            rows = list(session.scalars(select(Allocation).where(Allocation.id.in_(ids))))
        if all(r.access_applied_at for r in rows) or time.monotonic() >= deadline:
            return sorted(rows, key=lambda r: r.gpu_id)
        time.sleep(0.05)


@endpoint(
    bp,
    "GET",
    "/v1/allocations/<int:allocation_id>",
    response=s.AllocationOne,
    summary="One allocation (yours; admins: any)",
)
def get_allocation(allocation_id: int) -> dict[str, Any]:
    ctx = get_ctx()
    with ctx.db.session() as session:
        row = allocations.get(session, ctx.settings, me(), allocation_id)
    return {"allocation": row.to_dict()}


@endpoint(
    bp,
    "POST",
    "/v1/allocations/<int:allocation_id>/extend",
    body=s.ExtendRequest,
    response=s.AllocationOne,
    errors=(409,),
    summary="Extend an active allocation by `hours`",
)
def extend_allocation(allocation_id: int, body: s.ExtendRequest) -> dict[str, Any]:
    ctx = get_ctx()
    row = allocations.extend(ctx.db, ctx.settings, me(), allocation_id, body.hours)
    return {"allocation": row.to_dict()}


@endpoint(
    bp,
    "DELETE",
    "/v1/allocations/<int:allocation_id>",
    response=s.AllocationOne,
    errors=(409,),
    summary="Release an allocation now; the agent revokes access",
)
def release_allocation(allocation_id: int) -> dict[str, Any]:
    ctx = get_ctx()
    row = allocations.release(ctx.db, ctx.settings, me(), allocation_id)
    return {"allocation": row.to_dict()}


# --- audit log and inbox ----------------------------------------------------------------


@endpoint(
    bp,
    "GET",
    "/v1/events",
    query=s.EventQuery,
    response=s.EventList,
    summary="The audit log, newest first (yours; admins: everyone's). Page with before_id.",
)
def list_events(query: s.EventQuery) -> dict[str, Any]:
    ctx = get_ctx()
    user = me() if not is_admin() else query.user
    if query.user and query.user != me() and not is_admin():
        raise Forbidden("only admins can see other users' events")
    with ctx.db.session() as session:
        rows = events.query(
            session,
            user=user,
            kind=query.kind,
            gpu_id=query.gpu_id,
            host=query.host,
            since=_utc(query.since),
            until=_utc(query.until),
            before_id=query.before_id,
            limit=query.limit,
        )
    more = len(rows) == query.limit
    return {"events": [r.to_dict() for r in rows], "next_before_id": rows[-1].id if more else None}


def _utc(value: datetime | None) -> datetime | None:
    """A time from the query string as aware UTC (a time without an offset is UTC)."""
    if value is None:
        return None
    try:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError:
        raise Invalid(f"{value.isoformat()} is out of range once converted to UTC") from None


@endpoint(
    bp,
    "GET",
    "/v1/notifications",
    query=s.NotificationQuery,
    response=s.NotificationList,
    summary="Your inbox, newest first, and how many are unread",
)
def list_notifications(query: s.NotificationQuery) -> dict[str, Any]:
    with get_ctx().db.session() as session:
        rows = inbox.list_for(session, me(), query.unread, query.limit)
        unread = inbox.unread_count(session, me())
    return {"notifications": [r.to_dict() for r in rows], "unread": unread}


@endpoint(
    bp,
    "POST",
    "/v1/notifications/<int:notification_id>/read",
    response=s.NotificationOne,
    summary="Mark one of your notifications read",
)
def read_notification(notification_id: int) -> dict[str, Any]:
    row = inbox.mark_read(get_ctx().db, me(), notification_id)
    return {"notification": row.to_dict()}


# --- disk -------------------------------------------------------------------------------


@endpoint(
    bp,
    "GET",
    "/v1/disk",
    query=s.DiskQuery,
    response=s.DiskReport,
    summary="Your disk usage (home directory, filesystem); admins with all=1: every user's",
)
def disk_usage(query: s.DiskQuery) -> dict[str, Any]:
    from gpulocker import disk

    ctx = get_ctx()
    if query.all:
        if not is_admin():
            raise Forbidden("only admins can see every user's disk usage")
        return {"usage": None, "users": disk.usage_all(ctx)}
    return {"usage": disk.usage_for(ctx, me()), "users": None}


# --- admin ------------------------------------------------------------------------------


@endpoint(
    bp,
    "POST",
    "/v1/admin/reset",
    auth="admin",
    response=s.Count,
    summary="Release every allocation and restore the access baseline",
)
def admin_reset() -> dict[str, Any]:
    ctx = get_ctx()
    return {"count": allocations.reset(ctx.db, ctx.settings, me())}


@endpoint(
    bp,
    "POST",
    "/v1/admin/maintenance",
    auth="admin",
    body=s.MaintenanceRequest,
    response=s.MaintenanceState,
    summary="Switch maintenance mode (non-admins cannot allocate)",
)
def admin_maintenance(body: s.MaintenanceRequest) -> dict[str, Any]:
    ctx = get_ctx()
    maintenance.set_enabled(ctx.db, ctx.settings, me(), body.enabled, body.message)
    return {"enabled": body.enabled, "message": body.message}


@endpoint(
    bp,
    "POST",
    "/v1/admin/notify",
    auth="admin",
    body=s.NotifyRequest,
    response=s.Ok,
    summary="Send a message to a user (inbox and their channels)",
)
def admin_notify(body: s.NotifyRequest) -> dict[str, Any]:
    ctx = get_ctx()
    admin_message(ctx.db, ctx.settings, me(), body.user, body.message)
    return {"ok": True}


@endpoint(
    bp,
    "GET",
    "/v1/admin/lockouts",
    auth="admin",
    response=s.LockoutList,
    summary="Every lockout in force",
)
def admin_lockouts() -> dict[str, Any]:
    with get_ctx().db.session() as session:
        rows = lockouts.all_active(session)
    return {"lockouts": [r.to_dict() for r in rows]}


@endpoint(
    bp,
    "DELETE",
    "/v1/admin/lockouts/<user>",
    auth="admin",
    response=s.Count,
    summary="Lift a user's lockout now",
)
def admin_lift_lockout(user: str) -> dict[str, Any]:
    ctx = get_ctx()
    return {"count": lockouts.lift(ctx.db, ctx.settings, me(), user)}


# --- the description --------------------------------------------------------------------


@endpoint(
    bp,
    "GET",
    "/v1/openapi.json",
    auth="public",
    response=None,
    summary="This API described as OpenAPI 3.1",
)
def openapi() -> dict[str, Any]:
    return document(package_version())


def package_version() -> str:
    """The installed gpulocker version."""
    try:
        return version("gpulocker")
    except PackageNotFoundError:
        return "0+unknown"
