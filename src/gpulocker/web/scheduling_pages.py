"""The pages of SPEC section 11: the calendar (the coming days per GPU type, drawn on the
server, with its booking form) and the buttons that cancel a waiting request or a booking.

A blueprint nested in `pages` (so the CSRF check, the layout context and the error page
apply). Thin views: every read and change is an operation of gpulocker.operations, run as
the signed-in user, so the rules (who sees whose names, who may cancel what) are the
core's; a refusal shows next to the field it is about, with the form as typed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from flask import Blueprint, flash, redirect, render_template, request, url_for
from werkzeug.wrappers import Response as BaseResponse

from gpulocker import operations
from gpulocker.errors import Conflict, GPULockerError, Invalid, Quota
from gpulocker.models import BOOKED, utcnow
from gpulocker.web import calendar_layout
from gpulocker.web.errors import status_for
from gpulocker.web.forms import Page, me, safe_next
from gpulocker.web.session import get_ctx, is_admin, login_required

bp = Blueprint("scheduling", __name__)

DAY_CHOICES = (1, 3, 7, 14)
DEFAULT_DAYS = 7
FORM_TIME = "%Y-%m-%dT%H:%M"  # what <input type="datetime-local"> sends


def _run(name: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
    """Operation `name` as the signed-in user."""
    return operations.run(get_ctx(), me(), name, args or {})


# --- cancelling -------------------------------------------------------------------------


@bp.post("/requests/<int:request_id>/cancel")
@login_required
def cancel_request(request_id: int) -> BaseResponse:
    """Stop waiting in line (its user or an admin)."""
    try:
        row = _run("requests.cancel", {"id": request_id})["request"]
    except GPULockerError as exc:
        flash(exc.message, "error")
    else:
        flash(f"Request {row['id']} cancelled: you are out of the line.", "success")
    return redirect(safe_next(request.form.get("next"), url_for("pages.dashboard")))


@bp.post("/bookings/<int:booking_id>/cancel")
@login_required
def cancel_booking(booking_id: int) -> BaseResponse:
    """Cancel a booking (its holder or an admin); the GPUs are free again for that time."""
    try:
        row = _run("reservations.cancel", {"id": booking_id})["reservation"]
    except GPULockerError as exc:
        flash(exc.message, "error")
    else:
        whose = "" if row["user"] == me() else f" of {row['user']}"
        flash(f"Booking {row['id']}{whose} cancelled.", "success")
    return redirect(safe_next(request.form.get("next"), url_for("pages.scheduling.calendar")))


# --- the calendar -----------------------------------------------------------------------


@dataclass
class BookingForm:
    """The booking form as typed, so a refused form comes back filled in."""

    gpu_type: str = ""
    count: str = "1"
    start: str = ""
    end: str = ""
    user: str = ""
    errors: dict[str, str] = field(default_factory=dict)
    earliest: datetime | None = None  # a refusal's earliest start that would fit

    @classmethod
    def blank(cls, gpu_type: str) -> BookingForm:
        """Tomorrow 09:00-17:00 UTC, a common ask."""
        day = (utcnow() + timedelta(days=1)).replace(hour=9, minute=0, second=0, microsecond=0)
        return cls(
            gpu_type, "1", day.strftime(FORM_TIME), (day + timedelta(hours=8)).strftime(FORM_TIME)
        )

    @classmethod
    def from_request(cls) -> BookingForm:
        """Read the posted fields."""
        f = request.form
        return cls(
            gpu_type=f.get("gpu_type", "").strip(),
            count=f.get("count", "").strip(),
            start=f.get("start", "").strip(),
            end=f.get("end", "").strip(),
            user=f.get("user", "").strip(),
        )

    def parsed(self) -> dict[str, Any] | None:
        """The `reservations.book` arguments, or None with `errors` filled."""
        count = start = end = None
        try:
            count = int(self.count)
        except ValueError:
            self.errors["count"] = "Enter a whole number of GPUs, at least 1."
        start = _moment(self.start)
        if start is None:
            self.errors["start"] = "Enter the start as a date and a time (UTC)."
        end = _moment(self.end)
        if end is None:
            self.errors["end"] = "Enter the end as a date and a time (UTC)."
        elif start is not None and end <= start:
            self.errors["end"] = "The end must come after the start."
        if count is None or start is None or end is None or self.errors:
            return None
        args: dict[str, Any] = {"gpu_type": self.gpu_type, "count": count}
        args.update(start=start.isoformat(), hours=(end - start).total_seconds() / 3600)
        if self.user and self.user != me():
            args["user"] = self.user
        return args

    def refused(self, exc: GPULockerError) -> None:
        """Put the core's message next to the field it is about."""
        text = exc.message.lower()
        if isinstance(exc, Conflict):
            earliest = exc.details.get("earliest")
            self.earliest = datetime.fromisoformat(str(earliest)) if earliest else None
            self.errors["start"] = exc.message
        elif isinstance(exc, Quota):
            self.errors["_form"] = exc.message
        elif "hours" in text:
            self.errors["end"] = f"The booking is too long or too short: {exc.message}"
        else:
            for word, name in (("start", "start"), ("count", "count"), ("type", "gpu_type")):
                if word in text:
                    self.errors[name] = exc.message
                    return
            self.errors["user" if "user" in text else "_form"] = exc.message

    def instead(self) -> dict[str, str] | None:
        """The same booking moved to the earliest start that fits (a one-click retry)."""
        start, end = _moment(self.start), _moment(self.end)
        if self.earliest is None or start is None or end is None:
            return None
        new_start = self.earliest.astimezone(UTC)
        return {
            "gpu_type": self.gpu_type,
            "count": self.count,
            "start": new_start.strftime(FORM_TIME),
            "end": (new_start + (end - start)).strftime(FORM_TIME),
            "user": self.user,
        }


def _moment(text: str) -> datetime | None:
    """A time the form sent (UTC unless it names its zone), or None."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _days() -> int:
    try:
        days = int(request.args.get("days", DEFAULT_DAYS))
    except ValueError:
        days = DEFAULT_DAYS
    return days if days in DAY_CHOICES else DEFAULT_DAYS


@bp.get("/calendar")
@login_required
def calendar() -> Page:
    """The coming days per GPU type, and the booking form."""
    return _calendar(None)


def _calendar(form: BookingForm | None, status: int = 200) -> Page:
    days = _days()
    try:
        first = _run("calendar", {"days": days})
    except Invalid:  # no GPU registered yet, so no type to draw
        now = utcnow().isoformat()
        first = {"gpu_type": "", "types": [], "gpus": [], "from": now, "until": now}
    wanted = request.args.get("gpu_type", "")
    types = [t for t in first["types"] if t == wanted] or first["types"]
    sections = []
    for gpu_type in types:
        answer = first if gpu_type == first["gpu_type"] else None
        answer = answer or _run("calendar", {"gpu_type": gpu_type, "days": days})
        lanes, ticks = calendar_layout.layout(answer)
        sections.append({"gpu_type": gpu_type, "lanes": lanes, "ticks": ticks})
    admin = is_admin()
    bookings = _run("reservations.list_for", {"all": admin})["reservations"]
    form = form or BookingForm.blank(wanted or (types[0] if types else ""))
    if not admin and "user" in form.errors:  # the field is for admins: say it above the form
        form.errors["_form"] = form.errors.pop("user")
    html = render_template(
        "calendar.html",
        sections=sections,
        types=first["types"],
        shown_type=wanted if wanted in first["types"] else "",
        days=days,
        day_choices=DAY_CHOICES,
        window_from=calendar_layout.parse_time(first["from"]),
        window_until=calendar_layout.parse_time(first["until"]),
        multi_host=len({lane.host for s in sections for lane in s["lanes"]}) > 1,
        bookings=[b for b in bookings if b["state"] == BOOKED],
        show_users=admin,
        form=form,
        errors=form.errors,
        instead=form.instead(),
        max_days_ahead=get_ctx().settings.reservation_max_days_ahead,
        max_hours=get_ctx().settings.max_allocation_hours,
    )
    return html, status


@bp.post("/calendar/book")
@login_required
def book() -> Page:
    """Book GPUs ahead; a refusal comes back next to its field with the form as typed."""
    form = BookingForm.from_request()
    args = form.parsed()
    if args is None:
        return _calendar(form, 422)
    try:
        row = _run("reservations.book", args)["reservation"]
    except GPULockerError as exc:
        form.refused(exc)
        return _calendar(form, status_for(exc))
    start = calendar_layout.parse_time(row["start"])
    flash(
        f"Booked {row['count']} {row['gpu_type']} GPU(s) on {row['host']} for {row['user']} from "
        f"{start:%a %d %b %H:%M} UTC for {row['hours']:g} h (booking {row['id']}).",
        "success",
    )
    return redirect(url_for("pages.scheduling.calendar"))
