"""What the page views share: the request form as typed, where a refusal belongs, who is
signed in, and which redirect targets are safe."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from flask import request
from werkzeug.wrappers import Response as BaseResponse

from gpulocker.errors import (
    GPULockerError,
    Invalid,
    LockedOut,
    Maintenance,
    NotEnoughGPUs,
    NotFound,
)
from gpulocker.schemas import MAX_ID
from gpulocker.web.session import current_user

Page = str | BaseResponse | tuple[str, int]


def me() -> str:
    """The signed-in user (views behind login_required only)."""
    user = current_user()
    assert user is not None
    return user


def safe_next(target: str | None, default: str) -> str:
    """Only same-site paths are followed after sign-in or a form (no open redirect).

    Browsers drop tabs and newlines from a URL and read a backslash as a slash, so
    "/\t/evil.com" or "/\\evil.com" would leave the site; a control character in a
    Location header is also a crash. Anything with either falls back to `default`.
    """
    if not target or any(ord(c) < 0x20 or c in "\\\x7f" for c in target):
        return default
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return default
    if not parts.path.startswith("/") or parts.path.startswith("//"):
        return default
    return target


def int_arg(name: str) -> int | None:
    """A whole-number query argument (an id or a GPU), None when left empty.

    Refused (422) when it is not a number or out of 0..MAX_ID, as the API does: SQLite
    cannot bind an integer beyond 64 bits, and no id beyond MAX_ID exists.
    """
    raw = request.args.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_ID:
        raise Invalid(f"{name}: enter a whole number from 0 to {MAX_ID}")
    return value


def check_input() -> None:
    """Refuse what no view could store before any view runs.

    Ids in the path beyond MAX_ID cannot exist (404); NUL characters in a form, a query
    or a path value cannot be stored by PostgreSQL (422). Either way the styled error
    page answers and nothing is written.
    """
    for name, value in (request.view_args or {}).items():
        if isinstance(value, int) and not 0 <= value <= MAX_ID:
            raise NotFound(f"There is no such {name.replace('_', ' ')}.")
    _refuse_nul("the address", (request.view_args or {}).values())
    _refuse_nul("the address", (t for pair in request.args.items(multi=True) for t in pair))
    _refuse_nul("the form", (t for pair in request.form.items(multi=True) for t in pair))


def _refuse_nul(where: str, texts: Iterable[object]) -> None:
    if any(isinstance(t, str) and "\x00" in t for t in texts):
        raise Invalid(f"Text in {where} must not contain NUL characters.")


@dataclass
class RequestForm:
    """The request form as typed, so a refused form comes back filled in."""

    gpu_type: str = ""
    count: str = "1"
    duration: str = "4"
    unit: str = "hours"
    user: str = ""
    wait: bool = False  # wait in line when too few are free (SPEC section 11)
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
            wait=f.get("wait") == "1",
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
