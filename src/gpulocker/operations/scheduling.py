"""The scheduling operations of SPEC section 11 (queue, requests, bookings, calendar,
usage): thin calls into gpulocker.scheduling_ops. Their argument and answer models are
in gpulocker.schemas_scheduling."""

from __future__ import annotations

from typing import Any

from gpulocker import scheduling_ops as ops
from gpulocker.context import Context
from gpulocker.schemas_scheduling import AllArgs, BookArgs, CalendarArgs, IdArgs, SubmitArgs


def submit(ctx: Context, actor: str, a: SubmitArgs) -> dict[str, Any]:
    return ops.submit(ctx, actor, a.gpu_type, a.count, a.hours, a.wait_hours, a.user)


def requests(ctx: Context, actor: str, a: AllArgs) -> dict[str, Any]:
    return ops.request_list(ctx, actor, a.all)


def request_get(ctx: Context, actor: str, a: IdArgs) -> dict[str, Any]:
    return ops.request_get(ctx, actor, a.id)


def request_cancel(ctx: Context, actor: str, a: IdArgs) -> dict[str, Any]:
    return ops.request_cancel(ctx, actor, a.id)


def queue(ctx: Context, actor: str, _a: Any) -> dict[str, Any]:
    return ops.queue_view(ctx, actor)


def book(ctx: Context, actor: str, a: BookArgs) -> dict[str, Any]:
    return ops.book(ctx, actor, a.gpu_type, a.count, a.start, a.hours, a.user)


def bookings(ctx: Context, actor: str, a: AllArgs) -> dict[str, Any]:
    return ops.reservation_list(ctx, actor, a.all)


def booking_get(ctx: Context, actor: str, a: IdArgs) -> dict[str, Any]:
    return ops.reservation_get(ctx, actor, a.id)


def booking_cancel(ctx: Context, actor: str, a: IdArgs) -> dict[str, Any]:
    return ops.reservation_cancel(ctx, actor, a.id)


def calendar(ctx: Context, actor: str, a: CalendarArgs) -> dict[str, Any]:
    return ops.calendar(ctx, actor, a.gpu_type, a.days)


def usage(ctx: Context, actor: str, _a: Any) -> dict[str, Any]:
    return ops.me(ctx, actor)
