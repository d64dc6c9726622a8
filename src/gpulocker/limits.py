"""What a request for GPUs may ask for, judged without the database: who for, how many,
how long. The rules that read the database live in allocations."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from gpulocker.config import Settings
from gpulocker.errors import Forbidden, Invalid

USER_NAME = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}\$?$", re.IGNORECASE)


def check_request(
    settings: Settings,
    actor: str,
    user: str,
    count: int | None,
    hours: float,
    gpu_ids: Sequence[int] | None,
) -> int:
    """Validate what needs no database; returns the count."""
    if user != actor and not settings.is_admin(actor):
        raise Forbidden("only admins can allocate GPUs for another user")
    if not USER_NAME.match(user):
        raise Invalid(f"not a valid user name: {user!r}")
    if gpu_ids is not None:
        ids = list(gpu_ids)
        if not ids or len(set(ids)) != len(ids):
            raise Invalid("gpu_ids must list distinct GPU ids")
        if count is not None and count != len(ids):
            raise Invalid(f"count is {count} but {len(ids)} gpu_ids were given")
        count = len(ids)
    if count is None or isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise Invalid("count must be a whole number of GPUs, at least 1")
    check_hours(settings, hours)
    return count


def check_hours(settings: Settings, hours: float) -> None:
    """A duration a request or an extension may ask for."""
    if isinstance(hours, bool) or not isinstance(hours, int | float) or not math.isfinite(hours):
        raise Invalid("hours must be a number")
    if hours <= 0:
        raise Invalid("hours must be more than 0")
    if hours > settings.max_allocation_hours:
        raise Invalid(
            f"hours must be at most {settings.max_allocation_hours:g} (MAX_ALLOCATION_HOURS)"
        )
