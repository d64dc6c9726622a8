"""Every user-facing operation, once: the use cases behind the HTTP API, the local socket
and the terminal commands.

Each operation validates its arguments with one model of `gpulocker.schemas` (the same
model whichever surface the request came through), calls the core, and returns one
answer shape (the `Out` model named in the table). Refusals are the core's exceptions
(gpulocker.errors); each surface maps their `code` to its own form (an HTTP status, a
socket error line). The surfaces are tables over `OPERATIONS`: web/api.py declares the
paths, agent/localapi.py serves the names, cli/client.py maps the names onto the paths.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from gpulocker import schemas as s
from gpulocker import schemas_scheduling as ss
from gpulocker.context import Context
from gpulocker.errors import Invalid
from gpulocker.operations import admin, allocating
from gpulocker.operations import scheduling as q


@dataclass(frozen=True)
class Operation:
    """One use case: the function, the model of its arguments and of its answer."""

    func: Callable[[Context, str, Any], dict[str, Any]]
    args: type[BaseModel]
    answer: type[BaseModel]


OPERATIONS: dict[str, Operation] = {
    "me": Operation(allocating.me, s.NoArgs, ss.Me),
    "status": Operation(allocating.status, s.NoArgs, s.GpuStatus),
    "allocations.request": Operation(allocating.request, s.AllocationRequest, ss.AllocationAnswer),
    "allocations.list_for": Operation(
        allocating.list_for, s.AllocationListRequest, s.AllocationList
    ),
    "allocations.get": Operation(allocating.get, s.AllocationRef, s.AllocationOne),
    "allocations.extend": Operation(allocating.extend, s.ExtendArgs, s.AllocationOne),
    "allocations.release": Operation(allocating.release, s.AllocationRef, s.AllocationOne),
    "allocations.release_all": Operation(allocating.release_all, s.ReleaseAllRequest, s.Released),
    "allocations.reset": Operation(admin.reset, s.NoArgs, s.Count),
    "lockouts.all_active": Operation(admin.lockouts_all_active, s.NoArgs, s.LockoutList),
    "lockouts.lift": Operation(admin.lift_lockout, s.LiftRequest, s.Count),
    "maintenance.set_enabled": Operation(
        admin.set_maintenance, s.MaintenanceRequest, s.MaintenanceState
    ),
    "notify.admin_message": Operation(admin.notify_user, s.NotifyRequest, s.Ok),
    # SPEC section 11 (operations/scheduling.py)
    "requests.submit": Operation(q.submit, ss.SubmitArgs, ss.RequestOne),
    "requests.list_for": Operation(q.requests, ss.AllArgs, ss.RequestList),
    "requests.get": Operation(q.request_get, ss.IdArgs, ss.RequestOne),
    "requests.cancel": Operation(q.request_cancel, ss.IdArgs, ss.RequestOne),
    "queue.view": Operation(q.queue, s.NoArgs, ss.QueueOut),
    "reservations.book": Operation(q.book, ss.BookArgs, ss.ReservationOne),
    "reservations.list_for": Operation(q.bookings, ss.AllArgs, ss.ReservationList),
    "reservations.get": Operation(q.booking_get, ss.IdArgs, ss.ReservationOne),
    "reservations.cancel": Operation(q.booking_cancel, ss.IdArgs, ss.ReservationOne),
    "calendar": Operation(q.calendar, ss.CalendarArgs, ss.Calendar),
    "me.usage": Operation(q.usage, s.NoArgs, ss.Usage),
}


def run(ctx: Context, actor: str, name: str, args: Any) -> dict[str, Any]:
    """Validate `args` for operation `name`, then run it as `actor`; a bad request changes
    nothing, since every argument is checked before anything is done."""
    op = OPERATIONS.get(name)
    if op is None:
        raise Invalid(f"unknown operation {name!r} (known: {', '.join(OPERATIONS)})")
    return op.func(ctx, actor, s.validate(op.args, args))
