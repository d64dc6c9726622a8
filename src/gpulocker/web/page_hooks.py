"""What every HTML page shares: CSRF and input checks before each view, refusals as a
page, the security headers, the 404 page and the layout's context (who is signed in,
the unread count, maintenance). Installed on the pages blueprint by `install`."""

from __future__ import annotations

import socket
from typing import Any

from flask import Blueprint, render_template
from markupsafe import Markup
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response as BaseResponse

from gpulocker import inbox, maintenance
from gpulocker.errors import GPULockerError
from gpulocker.models import Setting
from gpulocker.web.errors import error_response, status_for, wants_json
from gpulocker.web.forms import check_input
from gpulocker.web.session import CSRF_FIELD, check_csrf, csrf_token, current_user, get_ctx


def install(bp: Blueprint) -> None:
    """Register the shared hooks on `bp`."""
    bp.before_request(_require_csrf)
    bp.before_request(_check_input)
    bp.errorhandler(GPULockerError)(_refused)
    bp.after_request(_security_headers)
    bp.app_errorhandler(404)(_not_found)
    bp.context_processor(_page_context)


def _require_csrf() -> None:
    """Every form posted to a page must carry the session's CSRF token."""
    check_csrf()


def _check_input() -> None:
    """Ids no row can have, and NUL characters, are refused before any view runs."""
    check_input()


def _refused(exc: GPULockerError) -> tuple[str, int]:
    """A refusal that reached no form (CSRF, admin only, unknown id) as an HTML page."""
    return render_template("error.html", message=exc.message), status_for(exc)


# Every script and style is our own file: a string that escaped escaping still cannot run.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
        "form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}


def _security_headers(response: BaseResponse) -> BaseResponse:
    """No inline scripts, no framing, no sniffing, on every page."""
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


def _not_found(exc: HTTPException) -> Any:
    """A page that does not exist gets a page saying so; the API keeps its JSON answer."""
    if wants_json():
        return error_response("not_found", exc.description or "not found", 404)
    return render_template("error.html", message="There is no such page."), 404


def _page_context() -> dict[str, Any]:
    """What the layout needs on every page: who is signed in, unread count, maintenance."""
    ctx = get_ctx()
    me = current_user()
    unread = 0
    with ctx.db.session() as session:
        row = session.get(Setting, maintenance.KEY)
        on = bool(row and row.value.get("enabled"))
        message = str(row.value.get("message") or "") if row and on else ""
        if me:
            unread = inbox.unread_count(session, me)
    return {
        "me": me,
        "is_admin": bool(me and ctx.settings.is_admin(me)),
        "unread_count": unread,
        "in_maintenance": on,
        "maintenance_message": message,
        "host_name": ctx.settings.gpu_host or socket.gethostname(),
        "refresh_seconds": ctx.settings.gpus_status_refresh_rate_seconds,
        "csrf_field": csrf_field,
    }


def csrf_field() -> Markup:
    """The hidden input every form carries."""
    return Markup('<input type="hidden" name="{}" value="{}">').format(CSRF_FIELD, csrf_token())
