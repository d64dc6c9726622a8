"""The shapes of the JSON API: what each endpoint accepts and returns.

The operations (gpulocker.operations) validate their input with these models, whichever
surface (HTTP API, local socket) the request came through, and `gpulocker.web.openapi`
builds the OpenAPI document from the same models, so the description cannot drift from
the code. This module imports only pydantic and the core's errors: the terminal client
may import it. Request bodies are strict (a string is not a number, unknown keys are
refused); query strings are parsed leniently since every value arrives as text.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gpulocker.errors import Invalid

MAX_ID = 2**31 - 1
UserName = Annotated[
    str, Field(min_length=1, max_length=32, pattern=r"^[A-Za-z_][A-Za-z0-9_.-]*\$?$")
]
GpuType = Annotated[str, Field(min_length=1, max_length=64)]
Hours = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Id = Annotated[int, Field(ge=1, le=MAX_ID)]
Timestamp = Annotated[str, Field(description="ISO 8601, UTC")]
State = Literal["active", "released", "expired", "revoked"]
StateOrAny = Literal["active", "released", "expired", "revoked", "any"]
AllocationId = Annotated[int, Field(description="out of range: not_found, like a missing one")]
M = TypeVar("M", bound=BaseModel)


class Body(BaseModel):
    """A request body: strict types, no unknown keys."""

    model_config = ConfigDict(strict=True, extra="forbid")


class Query(BaseModel):
    """Query-string parameters: text converted to the declared types, unknown keys ignored."""

    model_config = ConfigDict(extra="ignore")


class Out(BaseModel):
    """A response; documented, and checked against the real answers by the tests."""


# --- errors -----------------------------------------------------------------------------


class ErrorDetail(Out):
    model_config = ConfigDict(extra="allow")
    code: str = Field(description="stable machine-readable reason, e.g. not_enough_gpus")
    message: str = Field(description="for people")


class ErrorResponse(Out):
    error: ErrorDetail


# --- sign-in and tokens -----------------------------------------------------------------


class TokenRequest(Body):
    username: str = Field(min_length=1, max_length=255)
    password: str = Field(min_length=1, max_length=4096)
    name: str = Field(default="", max_length=255, description="a label for the token")


class TokenCreated(Out):
    token: str = Field(description="send as `Authorization: Bearer <token>`; shown only once")
    id: int
    username: str


class TokenInfo(Out):
    id: int
    name: str
    created_at: Timestamp
    expires_at: Timestamp | None
    last_used_at: Timestamp | None


class TokenList(Out):
    tokens: list[TokenInfo]


class Me(Out):
    username: str
    is_admin: bool
    locked_until: Timestamp | None


# --- GPUs -------------------------------------------------------------------------------


class GpuProcessOut(Out):
    pid: int | None
    user: str | None
    memory_mib: float | None
    name: str


class GpuStatusRow(Out):
    host: str
    gpu_id: int
    gpu_type: str
    name: str
    device: str
    healthy: bool
    error: str | None
    mig: bool
    sampled_at: Timestamp | None
    utilization: float | None
    memory_used_mib: float | None
    memory_total_mib: float | None
    temperature_c: float | None
    power_w: float | None
    held: bool = Field(description="whether someone holds the GPU now")
    holder: str | None = Field(description="null for anonymous callers")
    allocation_id: int | None = Field(description="null for anonymous callers")
    expires_at: Timestamp | None = Field(description="null for anonymous callers")
    processes: list[GpuProcessOut] = Field(description="empty for anonymous callers")
    reachable: bool = Field(description="false: its host's agent is silent, not granted")


class HostOut(Out):
    host: str
    agent: str = Field(description="ok, unreachable (silent for AGENT_STALE_SECONDS) or unknown")
    age_seconds: float | None = Field(description="since the agent's last heartbeat")


class GpuStatus(Out):
    at: Timestamp
    maintenance: bool
    gpus: list[GpuStatusRow]
    hosts: list[HostOut]


class HistoryQuery(Query):
    hours: float = Field(default=24.0, gt=0, le=24 * 366, allow_inf_nan=False)
    host: str | None = Field(default=None, max_length=255)


class HistoryPoint(Out):
    at: Timestamp
    utilization: float
    memory_used_mib: float


class History(Out):
    host: str
    gpu_id: int
    hours: float
    points: list[HistoryPoint]


# --- allocations ------------------------------------------------------------------------


class AllocationRequest(Body):
    gpu_type: GpuType
    count: int | None = Field(default=None, ge=1, le=1024, description="omit with gpu_ids")
    hours: Hours
    gpu_ids: list[Annotated[int, Field(ge=0, le=MAX_ID)]] | None = Field(
        default=None, max_length=1024
    )
    user: UserName | None = Field(default=None, description="admins: allocate for this user")
    wait: bool = Field(default=False, description="wait in line (202) when too few are free")
    wait_hours: Hours | None = Field(default=None, description="with wait: give up after this")


class ExtendRequest(Body):
    hours: Hours


class AllocationQuery(Query):
    all: bool = Field(default=False, description="admins: every user's")
    state: StateOrAny | None = Field(default=None, description="default: active; any: all states")


class AllocationListRequest(Body):
    """The arguments of the list operation (the query string above, once parsed)."""

    all: bool = False
    state: StateOrAny = "active"


class AllocationRef(Body):
    id: AllocationId


class ExtendArgs(Body):
    id: AllocationId
    hours: Hours


class ReleaseAllRequest(Body):
    user: UserName | None = Field(default=None, description="admins: this user's; default yours")


class LiftRequest(Body):
    user: UserName


class NoArgs(Body):
    """An operation that takes nothing."""


class AllocationOut(Out):
    id: int
    user: str
    host: str
    gpu_id: int
    gpu_type: str
    device: str
    state: State
    created_at: Timestamp
    expires_at: Timestamp
    released_at: Timestamp | None
    release_reason: str | None
    access_applied_at: Timestamp | None


class AllocationList(Out):
    allocations: list[AllocationOut]


class AllocationGranted(Out):
    allocations: list[AllocationOut]
    cuda_visible_devices: str = Field(description="value for CUDA_VISIBLE_DEVICES")
    access: Literal["applied", "pending"] = Field(
        description="applied: the device files already let you in"
    )
    agent: Literal["running", "not running"]


class Released(Out):
    released: int = Field(description="how many allocations were released")


class AllocationOne(Out):
    allocation: AllocationOut


# --- events and notifications -----------------------------------------------------------


class EventQuery(Query):
    user: UserName | None = Field(default=None, description="admins only; others see their own")
    kind: str | None = Field(default=None, max_length=64)
    gpu_id: int | None = Field(default=None, ge=0, le=MAX_ID)
    host: str | None = Field(default=None, max_length=255)
    since: datetime | None = Field(default=None, description="ISO 8601; UTC unless it says")
    until: datetime | None = Field(default=None, description="ISO 8601, exclusive")
    before_id: int | None = Field(default=None, ge=1, le=2**62, description="paging")
    limit: int = Field(default=50, ge=1, le=500)


class EventOut(Out):
    id: int
    at: Timestamp
    kind: str
    actor: str
    user: str | None
    host: str | None
    gpu_id: int | None
    allocation_id: int | None
    message: str
    data: dict[str, Any]


class EventList(Out):
    events: list[EventOut]
    next_before_id: int | None = Field(description="pass as before_id for the next page")


class NotificationQuery(Query):
    unread: bool = Field(default=False, description="only unread ones")
    limit: int = Field(default=100, ge=1, le=500)


class NotificationOut(Out):
    id: int
    kind: str
    message: str
    created_at: Timestamp
    read_at: Timestamp | None


class NotificationList(Out):
    notifications: list[NotificationOut]
    unread: int


class NotificationOne(Out):
    notification: NotificationOut


# --- disk -------------------------------------------------------------------------------


class DiskQuery(Query):
    all: bool = Field(default=False, description="admins: every user's")


class DiskUsageOut(Out):
    model_config = ConfigDict(extra="allow")
    user: str
    home: str | None = None
    used_bytes: int | None = Field(default=None, description="home directory size")
    scanned_bytes: int | None = Field(default=None, description="progress of a running scan")
    fs_total_bytes: int | None = None
    fs_used_bytes: int | None = None
    fs_free_bytes: int | None = None
    status: str = Field(description="pending, scanning, done or error")
    error: str | None = None
    measured_at: Timestamp | None = None
    stale: bool | None = Field(default=None, description="older than DISK_CACHE_TIMEOUT_SECONDS")


class DiskReport(Out):
    usage: DiskUsageOut | None = Field(description="yours (null with all=1)")
    users: list[DiskUsageOut] | None = Field(description="every user's (admins, all=1)")


# --- admin ------------------------------------------------------------------------------


class MaintenanceRequest(Body):
    enabled: bool
    message: str = Field(default="", max_length=1000)


class MaintenanceState(Out):
    enabled: bool
    message: str


class NotifyRequest(Body):
    user: UserName
    message: str = Field(min_length=1, max_length=4000)


class LockoutOut(Out):
    id: int
    user: str
    created_at: Timestamp
    until: Timestamp
    reason: str
    lifted_at: Timestamp | None


class LockoutList(Out):
    lockouts: list[LockoutOut]


class Count(Out):
    count: int


class Ok(Out):
    ok: Literal[True]


# --- validation -------------------------------------------------------------------------


def check_strings(prefix: str, value: Any) -> None:
    """Text the database cannot store (NUL, lone surrogates) is refused, not crashed on."""
    if isinstance(value, str):
        if "\x00" in value:
            raise Invalid(f"{prefix or 'value'}: must not contain NUL characters")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise Invalid(f"{prefix or 'value'}: must be valid Unicode text") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            check_strings(f"{prefix}.{key}" if prefix else str(key), item)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            check_strings(f"{prefix}[{index}]", item)


def validate(model: type[M], data: Any) -> M:
    """`data` as `model`, or Invalid naming each problem (at most five)."""
    if not isinstance(data, dict):
        raise Invalid("the arguments must be a JSON object")
    check_strings("", data)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}"
            for err in exc.errors()[:5]
        )
        raise Invalid(problems) from None
