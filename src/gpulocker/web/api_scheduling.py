"""The HTTP endpoints of SPEC section 11: thin entries over the operations of
gpulocker.operations (the same use cases, arguments and answers as the local socket)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint
from pydantic import Field

from gpulocker import operations
from gpulocker import schemas_scheduling as ss
from gpulocker.schemas import GpuType, Query
from gpulocker.web.api import me
from gpulocker.web.openapi import endpoint
from gpulocker.web.session import get_ctx

bp = Blueprint("api_scheduling", __name__, url_prefix="/api")


def _run(name: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
    """Operation `name` of gpulocker.operations as the signed-in user."""
    return operations.run(get_ctx(), me(), name, args or {})


class AllQuery(Query):
    all: bool = Field(default=False, description="admins: every user's")


class CalendarQuery(Query):
    gpu_type: GpuType | None = None
    days: float = Field(default=7, gt=0, le=ss.MAX_CALENDAR_DAYS)


@endpoint(
    bp,
    "GET",
    "/v1/queue",
    response=ss.QueueOut,
    summary="Every waiting request in order (names: yours, or all for admins)",
)
def queue() -> dict[str, Any]:
    return _run("queue.view")


@endpoint(
    bp,
    "POST",
    "/v1/requests",
    status=202,
    body=ss.SubmitArgs,
    response=ss.RequestOne,
    errors=(409,),
    summary="Wait in line for GPUs (granted at once when it can be)",
)
def submit(body: ss.SubmitArgs) -> dict[str, Any]:
    return _run("requests.submit", body.model_dump())


@endpoint(
    bp,
    "GET",
    "/v1/requests",
    query=AllQuery,
    response=ss.RequestList,
    summary="Your waiting and past requests (admins with all=1: everyone's)",
)
def list_requests(query: AllQuery) -> dict[str, Any]:
    return _run("requests.list_for", {"all": query.all})


@endpoint(
    bp,
    "GET",
    "/v1/requests/<int:request_id>",
    response=ss.RequestOne,
    summary="One request, with its position",
)
def get_request(request_id: int) -> dict[str, Any]:
    return _run("requests.get", {"id": request_id})


@endpoint(
    bp,
    "DELETE",
    "/v1/requests/<int:request_id>",
    response=ss.RequestOne,
    errors=(409,),
    summary="Cancel a waiting request",
)
def cancel_request(request_id: int) -> dict[str, Any]:
    return _run("requests.cancel", {"id": request_id})


@endpoint(
    bp,
    "POST",
    "/v1/reservations",
    status=201,
    body=ss.BookArgs,
    response=ss.ReservationOne,
    errors=(409,),
    summary="Book GPUs of a type for a future window (409 names the earliest start that fits)",
)
def book(body: ss.BookArgs) -> dict[str, Any]:
    return _run("reservations.book", body.model_dump())


@endpoint(
    bp,
    "GET",
    "/v1/reservations",
    query=AllQuery,
    response=ss.ReservationList,
    summary="Your bookings (admins with all=1: everyone's)",
)
def list_reservations(query: AllQuery) -> dict[str, Any]:
    return _run("reservations.list_for", {"all": query.all})


@endpoint(
    bp,
    "GET",
    "/v1/reservations/<int:reservation_id>",
    response=ss.ReservationOne,
    summary="One booking",
)
def get_reservation(reservation_id: int) -> dict[str, Any]:
    return _run("reservations.get", {"id": reservation_id})


@endpoint(
    bp,
    "DELETE",
    "/v1/reservations/<int:reservation_id>",
    response=ss.ReservationOne,
    errors=(409,),
    summary="Cancel a booking",
)
def cancel_reservation(reservation_id: int) -> dict[str, Any]:
    return _run("reservations.cancel", {"id": reservation_id})


@endpoint(
    bp,
    "GET",
    "/v1/calendar",
    query=CalendarQuery,
    response=ss.Calendar,
    summary="Per GPU of a type: allocations to their end and bookings, for drawing",
)
def calendar(query: CalendarQuery) -> dict[str, Any]:
    return _run("calendar", query.model_dump())


@endpoint(
    bp,
    "GET",
    "/v1/me/usage",
    response=ss.Usage,
    summary="Your usage, quota limits and fair-share usage",
)
def usage() -> dict[str, Any]:
    return _run("me.usage")
