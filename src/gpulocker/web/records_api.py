"""The JSON API's records of a user (SPEC section 7): the audit log, the inbox and the disk
usage. Reads of the core the local socket does not serve; same declarations as web/api.py."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from flask import Blueprint

from gpulocker import events, inbox
from gpulocker import schemas as s
from gpulocker.errors import Forbidden, Invalid
from gpulocker.web.api import me
from gpulocker.web.openapi import endpoint
from gpulocker.web.session import get_ctx, is_admin

bp = Blueprint("records", __name__, url_prefix="/api")


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
