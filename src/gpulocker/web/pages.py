"""The HTML pages a user sees: sign-in, dashboard, schedule, disk, inbox and settings.
The calendar and the cancel buttons of SPEC section 11 are in `scheduling_pages`.

Thin views: parse the form, call the core, and show the core's own refusal next to the
field it is about. Every POST is checked for the session's CSRF token before the view
runs. The admin pages live in `admin_pages` (a blueprint nested in this one).
"""

from __future__ import annotations

import math
from typing import Any

from flask import (
    Blueprint,
    flash,
    redirect,
    render_template,
    request,
    url_for,
)
from werkzeug.wrappers import Response as BaseResponse

from gpulocker import (
    allocations,
    auth,
    cudaline,
    gpustatus,
    inbox,
    inventory,
    lockouts,
    operations,
    scheduling_ops,
    tokens,
)
from gpulocker.errors import GPULockerError
from gpulocker.models import BOOKED, WAITING, utcnow
from gpulocker.notify import linking
from gpulocker.web import admin_pages, formatting, page_hooks, scheduling_pages
from gpulocker.web.errors import status_for
from gpulocker.web.forms import Page, RequestForm, int_arg, me, safe_next
from gpulocker.web.session import (
    client_address,
    current_user,
    get_ctx,
    login_required,
    login_user,
    logout_user,
)

bp = Blueprint("pages", __name__)
bp.register_blueprint(admin_pages.bp)
bp.register_blueprint(scheduling_pages.bp)
formatting.register(bp)
page_hooks.install(bp)

INBOX_PAGE = 50
RECENT = 5


# --- sign-in -------------------------------------------------------------------------


@bp.route("/login", methods=["GET", "POST"])
def login() -> Page:
    """The sign-in form; PAM checks the password (see gpulocker.auth)."""
    next_url = safe_next(request.args.get("next"), url_for("pages.dashboard"))
    if current_user() is not None and request.method == "GET":
        return redirect(next_url)
    if request.method == "GET":
        return render_template("login.html", errors={}, username="", next_url=next_url)
    username = request.form.get("username", "").strip()
    password = request.form.get("password", "")
    errors: dict[str, str] = {}
    if not username:
        errors["username"] = "Enter your Linux user name."
    if not password:
        errors["password"] = "Enter your password."  # noqa: S105 (a message, not a secret)
    if errors:
        return _login_page(username, next_url, errors, 422)
    try:
        user = auth.authenticate(get_ctx(), username, password, client_address())
    except auth.Throttled as exc:
        minutes = max(1, math.ceil(exc.retry_after / 60))
        message = f"Too many failed sign-ins. Try again in about {minutes} min."
        return _login_page(username, next_url, {"_form": message}, 429)
    except auth.BadCredentials:
        message = "Wrong user name or password."
        return _login_page(username, next_url, {"_form": message}, 401)
    login_user(user)
    return redirect(next_url)


def _login_page(username: str, next_url: str, errors: dict[str, str], status: int) -> Page:
    html = render_template("login.html", errors=errors, username=username, next_url=next_url)
    return html, status


@bp.post("/logout")
def logout() -> BaseResponse:
    """End the session for real (the server-side token is revoked)."""
    logout_user()
    flash("You are signed out.", "success")
    return redirect(url_for("pages.login"))


# --- dashboard and allocation forms ---------------------------------------------------


@bp.get("/")
@login_required
def dashboard() -> Page:
    """My GPUs, the line to paste, the request form."""
    return _dashboard(RequestForm())


def _dashboard(form: RequestForm, status: int = 200, errors: dict[str, str] | None = None) -> Page:
    ctx = get_ctx()
    user = me()
    with ctx.db.session() as session:
        mine = sorted(allocations.list_for(session, ctx.settings, user), key=lambda a: a.gpu_id)
        types = inventory.type_counts(session)
        lockout = lockouts.active(session, user)
        recent = inbox.list_for(session, user, limit=RECENT)
    if not form.gpu_type and types:
        form.gpu_type = max(types, key=lambda t: (types[t]["free"], t))
    requests = operations.run(ctx, user, "requests.list_for", {})["requests"]
    bookings = operations.run(ctx, user, "reservations.list_for", {})["reservations"]
    html = render_template(
        "dashboard.html",
        waiting=[r for r in requests if r["state"] == WAITING],
        bookings=[b for b in bookings if b["state"] == BOOKED],
        max_wait_hours=ctx.settings.queue_max_wait_hours,
        mine=mine,
        cuda=cudaline.export_line(allocations.cuda_visible_devices(ctx.db, mine)) if mine else "",
        multi_host=len({a.host for a in mine}) > 1,
        types=types,
        lockout=lockout,
        recent=recent,
        form=form,
        errors={**form.errors, **(errors or {})},
        max_hours=ctx.settings.max_allocation_hours,
    )
    return html, status


@bp.post("/allocations")
@login_required
def request_gpus() -> Page:
    """Take GPUs; a refusal is shown next to its field, with the form as typed."""
    ctx = get_ctx()
    form = RequestForm.from_request()
    parsed = form.parsed()
    if parsed is None:
        return _dashboard(form, 422)
    count, hours = parsed
    try:
        rows, waiting = scheduling_ops.take(ctx, me(), form.gpu_type, count, hours, wait=form.wait)
    except GPULockerError as exc:
        form.refused(exc)
        return _dashboard(form, status_for(exc))
    if waiting is not None:
        _flash_waiting(waiting)
        return redirect(url_for("pages.dashboard"))
    ids = ", ".join(str(r.gpu_id) for r in rows)
    flash(
        f"You have GPU {ids} ({rows[0].gpu_type}) until {rows[0].expires_at:%Y-%m-%d %H:%M} UTC.",
        "success",
    )
    return redirect(url_for("pages.dashboard"))


def _flash_waiting(waiting: dict[str, Any]) -> None:
    """Say where a request that could not be granted at once now stands."""
    if waiting["state"] != WAITING:  # GPUs freed up in the meantime: granted from the line
        flash(f"Request {waiting['id']} was granted from the line: see your GPUs.", "success")
        return
    flash(
        f"Too few {waiting['gpu_type']} GPUs are free: request {waiting['id']} waits in line "
        f"(place {waiting['position']}). You get them, and a notification, as soon as they "
        "free up.",
        "info",
    )


@bp.post("/allocations/<int:allocation_id>/release")
@login_required
def release(allocation_id: int) -> BaseResponse:
    """Give a GPU back now."""
    ctx = get_ctx()
    try:
        row = allocations.release(ctx.db, ctx.settings, me(), allocation_id)
    except GPULockerError as exc:
        flash(exc.message, "error")
    else:
        flash(f"Released GPU {row.gpu_id} ({row.gpu_type}).", "success")
    return redirect(safe_next(request.form.get("next"), url_for("pages.dashboard")))


@bp.post("/allocations/release-all")
@login_required
def release_all() -> BaseResponse:
    """Give every GPU I hold back."""
    ctx = get_ctx()
    ended = allocations.release_all(ctx.db, ctx.settings, me())
    flash(f"Released {ended} GPU(s).", "success")
    return redirect(url_for("pages.dashboard"))


@bp.post("/allocations/<int:allocation_id>/extend")
@login_required
def extend(allocation_id: int) -> Page:
    """Keep a GPU longer; a refusal shows next to that allocation's hours field."""
    ctx = get_ctx()
    key = f"extend-{allocation_id}"
    try:
        hours = float(request.form.get("hours", ""))
    except ValueError:
        return _dashboard(RequestForm(), 422, {key: "Enter a number of hours."})
    try:
        row = allocations.extend(ctx.db, ctx.settings, me(), allocation_id, hours)
    except GPULockerError as exc:
        return _dashboard(RequestForm(), status_for(exc), {key: exc.message})
    flash(f"GPU {row.gpu_id} is yours until {row.expires_at:%Y-%m-%d %H:%M} UTC.", "success")
    return redirect(url_for("pages.dashboard"))


# --- schedule ---------------------------------------------------------------------------


@bp.get("/schedule")
@login_required
def schedule() -> Page:
    """Every GPU, live; schedule.js refreshes it from /api/gpu_status without a reload."""
    snapshot = gpustatus.snapshot(get_ctx())
    gpus = snapshot["gpus"]
    return render_template(
        "schedule.html",
        gpus=gpus,
        multi_host=len({g["host"] for g in gpus}) > 1,
        hosts={h["host"]: h for h in snapshot.get("hosts", [])},
        snapshot_time=utcnow().strftime("%H:%M:%S UTC"),
    )


# --- disk -------------------------------------------------------------------------------


@bp.get("/disk")
@login_required
def disk() -> Page:
    """My home directory's size against its filesystem (measured off the request path)."""
    from gpulocker import disk as disk_usage

    return render_template("disk.html", usage=disk_usage.usage_for(get_ctx(), me()))


# --- notifications ------------------------------------------------------------------------


@bp.get("/notifications")
@login_required
def notifications() -> Page:
    """My inbox, newest first, a page at a time."""
    before = int_arg("before")
    with get_ctx().db.session() as session:
        items = inbox.list_for(session, me(), limit=INBOX_PAGE + 1, before_id=before)
    older = items[INBOX_PAGE - 1].id if len(items) > INBOX_PAGE else None
    return render_template("notifications.html", items=items[:INBOX_PAGE], older_than=older)


@bp.post("/notifications/<int:notification_id>/read")
@login_required
def read_one(notification_id: int) -> BaseResponse:
    """Mark one of my notifications read."""
    inbox.mark_read(get_ctx().db, me(), notification_id)
    return redirect(url_for("pages.notifications"))


@bp.post("/notifications/read-all")
@login_required
def read_all() -> BaseResponse:
    """Mark all my notifications read."""
    marked = inbox.mark_all_read(get_ctx().db, me())
    flash(f"{marked} notification(s) marked read.", "success")
    return redirect(url_for("pages.notifications"))


# --- settings: Telegram -------------------------------------------------------------------


@bp.get("/settings")
@login_required
def settings_page(new_token: str = "") -> Page:
    """Where my notifications go (link my Telegram chat), and my API tokens."""
    ctx = get_ctx()
    status = linking.link_status(ctx.db, me())
    instructions = linking.link_instructions(status["code"]) if status["code"] else ""
    with ctx.db.session() as session:
        api_tokens = tokens.list_for(session, me())
    return render_template(
        "settings.html",
        telegram_configured=bool(ctx.settings.telegram_bot_token),
        telegram=status,
        linked_at=formatting.as_datetime(status["linked_at"]),
        instructions=instructions,
        api_tokens=api_tokens,
        new_token=new_token,
    )


@bp.post("/settings/telegram/link")
@login_required
def telegram_link() -> BaseResponse:
    """A fresh one-time code to send to the bot."""
    ctx = get_ctx()
    if not ctx.settings.telegram_bot_token:
        flash("Telegram is not set up on this server.", "error")
    else:
        linking.start_link(ctx.db, me())
        flash("Send the code below to the bot; this page shows the chat once it is linked.", "info")
    return redirect(url_for("pages.settings_page"))


@bp.post("/settings/telegram/unlink")
@login_required
def telegram_unlink() -> BaseResponse:
    """Stop sending my notifications to Telegram."""
    if linking.unlink(get_ctx().db, me()):
        flash("Telegram unlinked: notifications now stay in the app.", "success")
    else:
        flash("No Telegram chat was linked.", "info")
    return redirect(url_for("pages.settings_page"))


# --- settings: API tokens -------------------------------------------------------------------


@bp.post("/settings/tokens")
@login_required
def create_token() -> Page:
    """A new API token for scripts and `gpulocker` on another machine; shown once."""
    name = request.form.get("name", "").strip() or "web"
    try:
        ctx = get_ctx()
        _row, raw = tokens.create(ctx.db, me(), name[:255], token_days=ctx.settings.token_days)
    except GPULockerError as exc:
        flash(exc.message, "error")
        return redirect(url_for("pages.settings_page"))
    return settings_page(new_token=raw)


@bp.post("/settings/tokens/<int:token_id>/revoke")
@login_required
def revoke_token(token_id: int) -> BaseResponse:
    """Revoke one of my API tokens."""
    row = tokens.revoke(get_ctx().db, me(), token_id)
    flash(f"Token {row.name!r} revoked.", "success")
    return redirect(url_for("pages.settings_page"))
