"""The admin operations: reset, lockouts, maintenance, a message to a user (see
gpulocker.operations for the table). The core refuses non-admins itself; the list of
lockouts, a plain read, is refused here."""

from __future__ import annotations

from typing import Any

from gpulocker import allocations, lockouts, maintenance
from gpulocker import schemas as s
from gpulocker.context import Context
from gpulocker.errors import Forbidden
from gpulocker.notify import admin_message


def reset(ctx: Context, actor: str, _args: s.NoArgs) -> dict[str, Any]:
    return {"count": allocations.reset(ctx.db, ctx.settings, actor)}


def lockouts_all_active(ctx: Context, actor: str, _args: s.NoArgs) -> dict[str, Any]:
    if not ctx.settings.is_admin(actor):
        raise Forbidden("only admins can list every lockout")
    with ctx.db.session() as session:
        return {"lockouts": [row.to_dict() for row in lockouts.all_active(session)]}


def lift_lockout(ctx: Context, actor: str, args: s.LiftRequest) -> dict[str, Any]:
    return {"count": lockouts.lift(ctx.db, ctx.settings, actor, args.user)}


def set_maintenance(ctx: Context, actor: str, args: s.MaintenanceRequest) -> dict[str, Any]:
    maintenance.set_enabled(ctx.db, ctx.settings, actor, args.enabled, args.message)
    return {"enabled": args.enabled, "message": args.message}


def notify_user(ctx: Context, actor: str, args: s.NotifyRequest) -> dict[str, Any]:
    admin_message(ctx.db, ctx.settings, actor, args.user, args.message)
    return {"ok": True}
