"""The HTTP endpoints of SPEC section 11: thin entries over gpulocker.scheduling_ops."""

from __future__ import annotations

from typing import Annotated, Any

from flask import Blueprint
from pydantic import ConfigDict, Field

from gpulocker import scheduling_ops as ops
from gpulocker.schemas import Body, GpuType, Hours, Out, Query, UserName
from gpulocker.web.api import me
from gpulocker.web.openapi import endpoint
from gpulocker.web.session import get_ctx

bp = Blueprint("api_scheduling", __name__, url_prefix="/api")

Count = Annotated[int, Field(ge=1, le=1024)]


class RequestBody(Body):
    gpu_type: GpuType
    count: Count = 1
    hours: Hours
    wait_hours: Hours | None = Field(default=None, description="at most QUEUE_MAX_WAIT_HOURS")
    user: UserName | None = Field(default=None, description="admins: for this user")


class RequestOut(Out):
    model_config = ConfigDict(extra="allow")
    id: int
    user: str | None
    gpu_type: str
    count: int
    hours: float
    state: str = Field(description="waiting, granted, cancelled or expired")
    position: int | None = Field(description="place in its type's line (1 = next)")
    wait_until: str | None


class RequestOne(Out):
    request: RequestOut


class RequestList(Out):
    requests: list[RequestOut]


class QueueOut(Out):
    queue: list[RequestOut]


class AllQuery(Query):
    all: bool = Field(default=False, description="admins: every user's")


class ReservationBody(Body):
    gpu_type: GpuType
    count: Count = 1
    start: str = Field(min_length=1, max_length=64, description="ISO 8601 with a zone")
    hours: Hours
    user: UserName | None = Field(default=None, description="admins: for this user")


class ReservationOut(Out):
    model_config = ConfigDict(extra="allow")
    id: int
    user: str
    gpu_type: str
    count: int
    host: str
    start: str
    end: str
    state: str = Field(description="booked, started, cancelled or failed")


class ReservationOne(Out):
    reservation: ReservationOut


class ReservationList(Out):
    reservations: list[ReservationOut]


class CalendarQuery(Query):
    gpu_type: GpuType | None = None
    days: float = Field(default=7, gt=0, le=ops.MAX_CALENDAR_DAYS)


class Calendar(Out):
    model_config = ConfigDict(extra="allow")
    gpu_type: str
    gpus: list[dict[str, Any]]


class Usage(Out):
    usage: dict[str, float | int]
    limits: dict[str, float | int | None]
    fairshare_usage: float


@endpoint(
    bp,
    "GET",
    "/v1/queue",
    response=QueueOut,
    summary="Every waiting request in order (names: yours, or all for admins)",
)
def queue() -> dict[str, Any]:
    return ops.queue_view(get_ctx(), me())


@endpoint(
    bp,
    "POST",
    "/v1/requests",
    status=202,
    body=RequestBody,
    response=RequestOne,
    errors=(409,),
    summary="Wait in line for GPUs (granted at once when it can be)",
)
def submit(body: RequestBody) -> dict[str, Any]:
    ctx = get_ctx()
    return ops.submit(ctx, me(), body.gpu_type, body.count, body.hours, body.wait_hours, body.user)


@endpoint(
    bp,
    "GET",
    "/v1/requests",
    query=AllQuery,
    response=RequestList,
    summary="Your waiting and past requests (admins with all=1: everyone's)",
)
def list_requests(query: AllQuery) -> dict[str, Any]:
    return ops.request_list(get_ctx(), me(), query.all)


@endpoint(
    bp,
    "GET",
    "/v1/requests/<int:request_id>",
    response=RequestOne,
    summary="One request, with its position",
)
def get_request(request_id: int) -> dict[str, Any]:
    return ops.request_get(get_ctx(), me(), request_id)


@endpoint(
    bp,
    "DELETE",
    "/v1/requests/<int:request_id>",
    response=RequestOne,
    errors=(409,),
    summary="Cancel a waiting request",
)
def cancel_request(request_id: int) -> dict[str, Any]:
    return ops.request_cancel(get_ctx(), me(), request_id)


@endpoint(
    bp,
    "POST",
    "/v1/reservations",
    status=201,
    body=ReservationBody,
    response=ReservationOne,
    errors=(409,),
    summary="Book GPUs of a type for a future window (409 names the earliest start that fits)",
)
def book(body: ReservationBody) -> dict[str, Any]:
    return ops.book(get_ctx(), me(), body.gpu_type, body.count, body.start, body.hours, body.user)


@endpoint(
    bp,
    "GET",
    "/v1/reservations",
    query=AllQuery,
    response=ReservationList,
    summary="Your bookings (admins with all=1: everyone's)",
)
def list_reservations(query: AllQuery) -> dict[str, Any]:
    return ops.reservation_list(get_ctx(), me(), query.all)


@endpoint(
    bp,
    "GET",
    "/v1/reservations/<int:reservation_id>",
    response=ReservationOne,
    summary="One booking",
)
def get_reservation(reservation_id: int) -> dict[str, Any]:
    return ops.reservation_get(get_ctx(), me(), reservation_id)


@endpoint(
    bp,
    "DELETE",
    "/v1/reservations/<int:reservation_id>",
    response=ReservationOne,
    errors=(409,),
    summary="Cancel a booking",
)
def cancel_reservation(reservation_id: int) -> dict[str, Any]:
    return ops.reservation_cancel(get_ctx(), me(), reservation_id)


@endpoint(
    bp,
    "GET",
    "/v1/calendar",
    query=CalendarQuery,
    response=Calendar,
    summary="Per GPU of a type: allocations to their end and bookings, for drawing",
)
def calendar(query: CalendarQuery) -> dict[str, Any]:
    return ops.calendar(get_ctx(), me(), query.gpu_type, query.days)


@endpoint(
    bp,
    "GET",
    "/v1/me/usage",
    response=Usage,
    summary="Your usage, quota limits and fair-share usage",
)
def usage() -> dict[str, Any]:
    return ops.me(get_ctx(), me())
