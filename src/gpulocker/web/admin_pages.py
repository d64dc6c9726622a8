"""The admin pages: every allocation, allocating for a user, lockouts, maintenance, reset,
messages, the events log and every user's disk usage.

A blueprint nested in `pages` (so the CSRF check, layout context and error page apply),
mounted at /admin; every view needs an admin. The core checks admin rights again.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, flash, redirect, render_template, request, url_for
from werkzeug.wrappers import Response as BaseResponse

from gpulocker import allocations, events, inventory, lockouts, maintenance
from gpulocker.errors import GPULockerError
from gpulocker.models import ACTIVE, Allocation
from gpulocker.notify import admin_message
from gpulocker.web.errors import status_for
from gpulocker.web.forms import Page, RequestForm, int_arg, me, safe_next
from gpulocker.web.session import admin_required, get_ctx

bp = Blueprint("admin", __name__, url_prefix="/admin")

EVENTS_PAGE = 50
# The events log's filters: only these go into its paging and filter links (any other
# argument, such as `endpoint` or `_external`, would be read by url_for itself).
EVENT_FILTERS = ("user", "kind", "gpu", "since", "until")
RESET_WORD = "reset"


@bp.before_request
@admin_required
def _admins_only() -> None:
    """Every admin page needs an admin; others get the error page (403)."""


@bp.get("/")
def overview() -> Page:
    """Allocations, lockouts and the admin forms."""
    return _overview()


def _overview(
    form: RequestForm | None = None,
    message_form: dict[str, str] | None = None,
    status: int = 200,
) -> Page:
    ctx = get_ctx()
    with ctx.db.session() as session:
        active = allocations.list_for(session, ctx.settings, me(), all_users=True, state=ACTIVE)
        types = inventory.type_counts(session)
        locked = lockouts.all_active(session)
        on = maintenance.enabled(session)
    form = form or RequestForm()
    if not form.gpu_type and types:
        form.gpu_type = max(types, key=lambda t: (types[t]["free"], t))
    message_form = message_form or {}
    html = render_template(
        "admin/overview.html",
        active=sorted(active, key=lambda a: (a.host, a.gpu_id)),
        types=types,
        lockouts=locked,
        maintenance_on=on,
        form=form,
        errors=form.errors,
        message_form=message_form,
        message_errors={k[4:]: v for k, v in message_form.items() if k.startswith("err_")},
        max_hours=ctx.settings.max_allocation_hours,
    )
    return html, status


@bp.post("/allocate")
def allocate() -> Page:
    """Allocate GPUs for a user; refusals show next to their field."""
    ctx = get_ctx()
    form = RequestForm.from_request()
    if not form.user:
        form.errors["user"] = "Say which user gets the GPUs."
    parsed = form.parsed()
    if parsed is None or form.errors:
        return _overview(form, status=422)
    count, hours = parsed
    try:
        rows = allocations.request(
            ctx.db, ctx.settings, me(), form.gpu_type, count, hours, user=form.user
        )
    except GPULockerError as exc:
        form.refused(exc)
        return _overview(form, status=status_for(exc))
    ids = ", ".join(str(r.gpu_id) for r in rows)
    flash(f"{form.user} has GPU {ids} ({rows[0].gpu_type}) for {hours:g} h.", "success")
    return redirect(url_for("pages.admin.overview"))


@bp.post("/allocations/<int:allocation_id>/release")
def release(allocation_id: int) -> BaseResponse:
    """Release anyone's allocation (the holder is told)."""
    ctx = get_ctx()
    try:
        row = allocations.release(ctx.db, ctx.settings, me(), allocation_id)
    except GPULockerError as exc:
        flash(exc.message, "error")
    else:
        flash(f"Released GPU {row.gpu_id} of {row.user}.", "success")
    return redirect(safe_next(request.form.get("next"), url_for("pages.admin.overview")))


@bp.post("/lockouts/<user>/lift")
def lift(user: str) -> BaseResponse:
    """Let a locked-out user allocate again."""
    ctx = get_ctx()
    try:
        lockouts.lift(ctx.db, ctx.settings, me(), user)
    except GPULockerError as exc:
        flash(exc.message, "error")
    else:
        flash(f"Lifted the lockout of {user}.", "success")
    return redirect(url_for("pages.admin.overview"))


@bp.post("/maintenance")
def set_maintenance() -> BaseResponse:
    """Switch maintenance mode on (with an optional note) or off."""
    ctx = get_ctx()
    on = request.form.get("enabled") == "on"
    note = request.form.get("message", "").strip()[:500]
    maintenance.set_enabled(ctx.db, ctx.settings, me(), on, note)
    flash(f"Maintenance mode is {'on' if on else 'off'}.", "success")
    return redirect(url_for("pages.admin.overview"))


@bp.post("/message")
def message() -> Page:
    """Send a user a message (their inbox and linked channels)."""
    ctx = get_ctx()
    user = request.form.get("user", "").strip()
    text = request.form.get("message", "")
    fields = {"user": user, "message": text}
    if not user:
        return _overview(message_form={**fields, "err_user": "Say who to message."}, status=422)
    try:
        admin_message(ctx.db, ctx.settings, me(), user, text)
    except GPULockerError as exc:
        return _overview(message_form={**fields, "err_message": exc.message}, status=422)
    flash(f"Message sent to {user}.", "success")
    return redirect(url_for("pages.admin.overview"))


@bp.get("/reset")
def reset_confirm() -> Page:
    """The confirmation step before a reset: what it will do, and a word to type."""
    return render_template("admin/reset.html", active=_active(), word=RESET_WORD, error="")


@bp.post("/reset")
def reset() -> Page:
    """Release every allocation, once the admin typed the confirmation word."""
    ctx = get_ctx()
    if request.form.get("confirm", "").strip().lower() != RESET_WORD:
        error = f'Type "{RESET_WORD}" to confirm.'
        html = render_template("admin/reset.html", active=_active(), word=RESET_WORD, error=error)
        return html, 422
    ended = allocations.reset(ctx.db, ctx.settings, me())
    flash(f"Reset done: {ended} allocation(s) ended; access goes back to the baseline.", "success")
    return redirect(url_for("pages.admin.overview"))


def _active() -> list[Allocation]:
    """Every active allocation, by host and GPU."""
    ctx = get_ctx()
    with ctx.db.session() as session:
        rows = allocations.list_for(session, ctx.settings, me(), all_users=True, state=ACTIVE)
    return sorted(rows, key=lambda a: (a.host, a.gpu_id))


# --- the events log --------------------------------------------------------------------


def _parse_time(raw: str | None) -> datetime | None:
    """A `datetime-local` value (taken as UTC), or None when empty or malformed."""
    if not raw:
        return None
    try:
        return datetime.fromisoformat(raw).replace(tzinfo=UTC)
    except ValueError:
        return None


@bp.get("/events")
def events_log() -> Page:
    """The audit log, newest first, filtered by user, GPU, kind and time, a page at a time."""
    args = request.args
    filters: dict[str, Any] = {
        "user": args.get("user", "").strip() or None,
        "kind": args.get("kind", "").strip() or None,
        "gpu_id": int_arg("gpu"),
        "since": _parse_time(args.get("since")),
        "until": _parse_time(args.get("until")),
    }
    before = int_arg("before")
    with get_ctx().db.session() as session:
        rows = events.query(session, **filters, before_id=before, limit=EVENTS_PAGE + 1)
        kinds = events.kinds(session)
    more = len(rows) > EVENTS_PAGE
    rows = rows[:EVENTS_PAGE]
    query: dict[str, Any] = {k: args[k] for k in EVENT_FILTERS if args.get(k)}
    return render_template(
        "admin/events.html",
        rows=rows,
        kinds=kinds,
        args=args,
        query=query,
        older=url_for(".events_log", **query, before=rows[-1].id) if more and rows else None,
        newest=url_for(".events_log", **query) if before else None,
    )


# --- disk ------------------------------------------------------------------------------


@bp.get("/disk")
def disk() -> Page:
    """Every user's home directory size, largest first."""
    from gpulocker import disk as disk_usage

    return render_template("admin/disk.html", usages=disk_usage.usage_all(get_ctx()))
