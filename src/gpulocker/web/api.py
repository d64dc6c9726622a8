"""The JSON API (SPEC section 7): thin views over the core.

Each view parses (through `endpoint`), runs one operation of gpulocker.operations (the
same use cases the local socket serves) or a read of the core, and returns a dict; the core's
refusals become 4xx answers in `gpulocker.web.errors`. A user only ever sees their own
allocations, tokens and notifications: the core functions take the actor and refuse
(NotFound) anything that is not theirs, unless the actor is an admin.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

from flask import Blueprint, Response, current_app

from gpulocker import (
    auth,
    history,
    inventory,
    operations,
    tokens,
)
from gpulocker import schemas as s
from gpulocker import schemas_scheduling as ss
from gpulocker.errors import NotFound
from gpulocker.models import Gpu
from gpulocker.web.errors import Unauthorized
from gpulocker.web.openapi import document, endpoint
from gpulocker.web.session import (
    client_address,
    current_user,
    forget_tokens,
    get_ctx,
)
from gpulocker.web.status_cache import STATUS_CACHE, StatusCache

bp = Blueprint("api", __name__, url_prefix="/api")


def _run(name: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
    """Operation `name` of gpulocker.operations as the signed-in user."""
    return operations.run(get_ctx(), me(), name, args or {})


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


@endpoint(
    bp,
    "GET",
    "/v1/me",
    response=ss.Me,
    summary="Who you are, your usage, quota limits and fair-share usage",
)
def who_am_i() -> dict[str, Any]:
    return _run("me")


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
    return _run("allocations.list_for", {"all": query.all, "state": query.state or "active"})


@endpoint(
    bp,
    "POST",
    "/v1/allocations",
    status=201,
    body=s.AllocationRequest,
    response=s.AllocationGranted,
    also={202: ss.RequestOne},
    errors=(409,),
    summary="Take GPUs of a type for a time, all or nothing. Answers once the device "
    "files let you in (at most ~2 s) when the agent runs. With `wait`, too few free GPUs "
    "make a waiting request (202) instead of a refusal (409).",
)
def request_allocation(body: s.AllocationRequest) -> dict[str, Any] | tuple[dict[str, Any], int]:
    answer = _run("allocations.request", body.model_dump())
    return (answer, 202) if "request" in answer else answer


@endpoint(
    bp,
    "POST",
    "/v1/allocations/release",
    body=s.ReleaseAllRequest,
    response=s.Released,
    summary="Release every active allocation of yours (admins: of `user`) at once",
)
def release_all_allocations(body: s.ReleaseAllRequest) -> dict[str, Any]:
    return _run("allocations.release_all", body.model_dump())


@endpoint(
    bp,
    "GET",
    "/v1/allocations/<int:allocation_id>",
    response=s.AllocationOne,
    summary="One allocation (yours; admins: any)",
)
def get_allocation(allocation_id: int) -> dict[str, Any]:
    return _run("allocations.get", {"id": allocation_id})


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
    return _run("allocations.extend", {"id": allocation_id, **body.model_dump()})


@endpoint(
    bp,
    "DELETE",
    "/v1/allocations/<int:allocation_id>",
    response=s.AllocationOne,
    errors=(409,),
    summary="Release an allocation now; the agent revokes access",
)
def release_allocation(allocation_id: int) -> dict[str, Any]:
    return _run("allocations.release", {"id": allocation_id})


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
    return _run("allocations.reset")


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
    return _run("maintenance.set_enabled", body.model_dump())


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
    return _run("notify.admin_message", body.model_dump())


@endpoint(
    bp,
    "GET",
    "/v1/admin/lockouts",
    auth="admin",
    response=s.LockoutList,
    summary="Every lockout in force",
)
def admin_lockouts() -> dict[str, Any]:
    return _run("lockouts.all_active")


@endpoint(
    bp,
    "DELETE",
    "/v1/admin/lockouts/<user>",
    auth="admin",
    response=s.Count,
    summary="Lift a user's lockout now",
)
def admin_lift_lockout(user: str) -> dict[str, Any]:
    return _run("lockouts.lift", {"user": user})


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
