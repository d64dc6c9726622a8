"""The scheduling operations of SPEC section 11 (queue, requests, bookings, calendar,
usage): argument models and thin calls into gpulocker.scheduling_ops."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import ConfigDict, Field

from gpulocker import scheduling_ops as ops
from gpulocker.context import Context
from gpulocker.schemas import Body, GpuType, Hours, Out, UserName

Count = Annotated[int, Field(ge=1, le=1024)]


class SubmitArgs(Body):
    gpu_type: GpuType
    count: Count = 1
    hours: Hours
    wait_hours: Hours | None = Field(default=None, description="at most QUEUE_MAX_WAIT_HOURS")
    user: UserName | None = Field(default=None, description="admins: for this user")


class AllArgs(Body):
    all: bool = False


class IdArgs(Body):
    id: Annotated[int, Field(ge=1, le=2**31 - 1)]


class BookArgs(Body):
    gpu_type: GpuType
    count: Count = 1
    start: str = Field(min_length=1, max_length=64, description="ISO 8601 with a zone")
    hours: Hours
    user: UserName | None = None


class CalendarArgs(Body):
    gpu_type: GpuType | None = None
    days: Annotated[float, Field(gt=0, le=ops.MAX_CALENDAR_DAYS)] = 7


class Loose(Out):
    """Answers documented in docs/scheduling.md; their keys are checked by the tests."""

    model_config = ConfigDict(extra="allow")


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
