"""What the page views share: the request form as typed, where a refusal belongs, who is
signed in, and which redirect targets are safe."""

from __future__ import annotations

from dataclasses import dataclass, field

from flask import request
from werkzeug.wrappers import Response as BaseResponse

from gpulocker.errors import GPULockerError, Invalid, LockedOut, Maintenance, NotEnoughGPUs
from gpulocker.web.session import current_user

Page = str | BaseResponse | tuple[str, int]


def me() -> str:
    """The signed-in user (views behind login_required only)."""
    user = current_user()
    assert user is not None
    return user


def safe_next(target: str | None, default: str) -> str:
    """Only same-site paths are followed after sign-in or a form (no open redirect)."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return default


@dataclass
class RequestForm:
    """The request form as typed, so a refused form comes back filled in."""

    gpu_type: str = ""
    count: str = "1"
    duration: str = "4"
    unit: str = "hours"
    user: str = ""
    errors: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_request(cls) -> RequestForm:
        """Read the posted fields."""
        f = request.form
        unit = f.get("unit", "hours")
        return cls(
            gpu_type=f.get("gpu_type", "").strip(),
            count=f.get("count", "").strip(),
            duration=f.get("duration", "").strip(),
            unit=unit if unit in ("hours", "days") else "hours",
            user=f.get("user", "").strip(),
        )

    def parsed(self) -> tuple[int, float] | None:
        """(count, hours), or None with `errors` filled for the fields that do not parse."""
        count = hours = None
        try:
            count = int(self.count)
        except ValueError:
            self.errors["count"] = "Enter a whole number of GPUs, at least 1."
        try:
            value = float(self.duration)
            hours = value * 24 if self.unit == "days" else value
        except ValueError:
            self.errors["duration"] = "Enter a number of hours or days."
        if count is None or hours is None:
            return None
        return count, hours

    def refused(self, exc: GPULockerError) -> None:
        """Put the core's message next to the field it is about."""
        self.errors[field_of(exc)] = exc.message


def field_of(exc: GPULockerError) -> str:
    """Which request-form field a refusal is about ("_form" for the whole form)."""
    if isinstance(exc, LockedOut | Maintenance):
        return "_form"
    if isinstance(exc, NotEnoughGPUs):
        return "count"
    if isinstance(exc, Invalid):
        text = exc.message.lower()
        for word, name in (("hours", "duration"), ("count", "count"), ("type", "gpu_type")):
            if word in text:
                return name
        if "user" in text:
            return "user"
    return "_form"
