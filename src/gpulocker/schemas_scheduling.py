"""The shapes of SPEC section 11 (waiting requests, bookings, the calendar, usage), and of
`me`, which shows usage, quota limits and fair share since then.

One set of models for every surface: the operations validate their arguments with the
`Body` models below whether the call came over HTTP or the socket, and the OpenAPI
document describes the answers with the `Out` models, which the tests check against the
real answers. Like `schemas`, this imports only pydantic.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import ConfigDict, Field, RootModel

from gpulocker import schemas as s
from gpulocker.schemas import Body, GpuType, Hours, Out, Timestamp, UserName

MAX_CALENDAR_DAYS = 31
Count = Annotated[int, Field(ge=1, le=1024)]


# --- arguments --------------------------------------------------------------------------


class SubmitArgs(Body):
    gpu_type: GpuType
    count: Count = 1
    hours: Hours
    wait_hours: Hours | None = Field(default=None, description="at most QUEUE_MAX_WAIT_HOURS")
    user: UserName | None = Field(default=None, description="admins: for this user")


class AllArgs(Body):
    all: bool = False


class IdArgs(Body):
    id: Annotated[int, Field(ge=1, le=s.MAX_ID)]


class BookArgs(Body):
    gpu_type: GpuType
    count: Count = 1
    start: str = Field(min_length=1, max_length=64, description="ISO 8601 with a zone")
    hours: Hours
    user: UserName | None = Field(default=None, description="admins: for this user")


class CalendarArgs(Body):
    gpu_type: GpuType | None = None
    days: Annotated[float, Field(gt=0, le=MAX_CALENDAR_DAYS)] = 7


# --- answers ----------------------------------------------------------------------------


class RequestOut(Out):
    model_config = ConfigDict(extra="allow")
    id: int
    user: str | None = Field(description="null in the queue for other people's requests")
    gpu_type: str
    count: int
    hours: float
    state: str = Field(description="waiting, granted, cancelled or expired")
    position: int | None = Field(description="place in its type's line (1 = next)")
    created_at: Timestamp
    wait_until: Timestamp | None
    allocation_ids: list[int] = Field(description="once granted")


class RequestOne(Out):
    request: RequestOut


class RequestList(Out):
    requests: list[RequestOut]


class QueueOut(Out):
    queue: list[RequestOut]


class ReservationOut(Out):
    model_config = ConfigDict(extra="allow")
    id: int
    user: str
    gpu_type: str
    count: int
    host: str
    start: Timestamp
    end: Timestamp
    hours: float
    state: str = Field(description="booked, started, cancelled or failed")


class ReservationOne(Out):
    reservation: ReservationOut


class ReservationList(Out):
    reservations: list[ReservationOut]


class CalendarItem(Out):
    kind: str = Field(description="allocation or reservation")
    id: int | None = Field(description="null unless it is yours (admins: always)")
    user: str | None = Field(description="null unless it is yours (admins: always)")
    start: Timestamp
    end: Timestamp
    mine: bool


class CalendarGpu(Out):
    host: str
    gpu_id: int
    items: list[CalendarItem]


class Calendar(Out):
    model_config = ConfigDict(extra="allow")
    gpu_type: str
    types: list[str]
    gpus: list[CalendarGpu]


class Usage(Out):
    usage: dict[str, float | int] = Field(
        description="gpus: held now; gpu_hours_week: held, running and booked in 7 days"
    )
    limits: dict[str, float | int | None] = Field(
        description="max_gpus and gpu_hours_per_week (QUOTAS, MAX_GPUS_PER_USER); null: none"
    )
    fairshare_usage: float = Field(description="decayed GPU-hours: the smaller, the sooner")


class Me(s.Me, Usage):
    """Who you are, what you use, your limits and your fair-share usage (SPEC section 11)."""


class AllocationAnswer(RootModel[s.AllocationGranted | RequestOne]):
    """A request's answer: granted (201), or with `wait` a waiting request (202)."""
