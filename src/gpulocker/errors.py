"""The domain's exceptions. Each has a stable `code`; the web layer maps them to statuses."""

from __future__ import annotations


class GPULockerError(Exception):
    """Base of every refusal the core makes on purpose; `str()` is for the user."""

    code = "error"

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class Invalid(GPULockerError):
    """The input is malformed or out of range (unknown type, bad hours...)."""

    code = "invalid"


class NotFound(GPULockerError):
    """No such thing, or not one the caller may see."""

    code = "not_found"


class Forbidden(GPULockerError):
    """The caller may not do this."""

    code = "forbidden"


class LockedOut(Forbidden):
    """The user is locked out after a violation."""

    code = "locked_out"


class Maintenance(Forbidden):
    """Maintenance mode: only admins may allocate."""

    code = "maintenance"


class NotEnoughGPUs(GPULockerError):
    """Fewer free GPUs of the type than asked for."""

    code = "not_enough_gpus"


class Conflict(GPULockerError):
    """The thing is not in a state that allows this (e.g. extending a released allocation)."""

    code = "conflict"


class Unavailable(GPULockerError):
    """A service GPULocker needs (the database) cannot be reached; says which key to check."""

    code = "unavailable"


class Quota(Forbidden):
    """A request would pass the user's quota (QUOTAS, MAX_GPUS_PER_USER)."""

    code = "quota"
