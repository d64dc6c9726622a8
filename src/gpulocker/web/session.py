"""Who is asking: web sign-ins (session cookie), API tokens (`Authorization: Bearer`), CSRF.

A web sign-in is a server-side token (see `gpulocker.tokens`) whose raw value sits in
Flask's signed, HttpOnly, SameSite=Lax cookie; signing out revokes it. Pages and the API
both call `current_user()`. Forms carry `csrf_token()` in a hidden field named
`csrf_token`; scripts calling the API with the session cookie send it in the
`X-CSRF-Token` header (bearer-token callers need none: a browser never adds that header
by itself).
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps
from typing import Any, TypeVar, cast

from flask import current_app, g, redirect, request, session, url_for

from gpulocker import tokens
from gpulocker.context import Context
from gpulocker.errors import Forbidden
from gpulocker.web.errors import Unauthorized
from gpulocker.web.status_cache import CHANGES, ChangeCounter

F = TypeVar("F", bound=Callable[..., Any])

CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
_UNSET = object()
IDENTITY_SECONDS = 5.0


def get_ctx() -> Context:
    """The app's Context (settings, database, Redis)."""
    return cast(Context, current_app.extensions["gpulocker"])


def current_identity() -> tokens.Identity | None:
    """The caller's identity from a bearer token or the session cookie; cached per request."""
    cached = g.get("_gpulocker_identity", _UNSET)
    if cached is not _UNSET:
        return cast("tokens.Identity | None", cached)
    identity = _identify()
    g._gpulocker_identity = identity
    return identity


def _identify() -> tokens.Identity | None:
    header = request.headers.get("Authorization", "")
    if header:
        scheme, _, raw = header.partition(" ")
        if scheme.lower() != "bearer" or not raw.strip():
            return None
        identity = _authenticate(raw.strip())
        return identity if identity is not None and identity.kind == tokens.API else None
    if current_app.config["SESSION_COOKIE_NAME"] not in request.cookies:
        return None  # no cookie: anonymous, without touching (and re-sending) the session
    cookie_token = session.get("token")
    if not isinstance(cookie_token, str):
        return None
    identity = _authenticate(cookie_token)
    if identity is None or identity.kind != tokens.WEB:
        session.clear()
        return None
    return identity


@dataclass(frozen=True)
class _Known:
    identity: tokens.Identity
    made: float
    changes: int


_known: dict[str, _Known] = {}
_known_lock = threading.Lock()


def _authenticate(raw: str) -> tokens.Identity | None:
    """`tokens.authenticate`, remembered for a few seconds per process.

    Every request of a script or a polling page carries its token; asking the database
    each time would be most of the request's cost. A remembered token is forgotten when
    anything is written through this server (sign-out and token revocation included,
    which bumps the shared change counter) and after `IDENTITY_SECONDS` at most.
    """
    changes: ChangeCounter = current_app.extensions[CHANGES]
    now = time.monotonic()
    known = _known.get(raw)
    if known is not None and known.changes == changes.value and now - known.made < IDENTITY_SECONDS:
        return known.identity
    counted = changes.value
    ctx = get_ctx()
    identity = tokens.authenticate(ctx.db, raw, ctx.settings.token_days)
    with _known_lock:
        if len(_known) > 10_000:
            _known.clear()
        if identity is None:
            _known.pop(raw, None)
        else:
            _known[raw] = _Known(identity, now, counted)
    return identity


def forget_tokens() -> None:
    """A token was revoked: every worker of this server asks the database again."""
    changes: ChangeCounter = current_app.extensions[CHANGES]
    changes.bump()


def current_user() -> str | None:
    """The signed-in user's name, or None."""
    identity = current_identity()
    return identity.user if identity else None


def is_admin() -> bool:
    """Whether the caller is signed in and in PRIVILEGED_USERS."""
    user = current_user()
    return user is not None and get_ctx().settings.is_admin(user)


def login_user(user: str) -> None:
    """Start a web session for `user` (after PAM said yes). A fresh session: no fixation."""
    row, raw = tokens.create(
        get_ctx().db,
        user,
        name=request.user_agent.string[:200],
        kind=tokens.WEB,
        hours=tokens.WEB_SESSION_HOURS,
    )
    session.clear()
    session.permanent = True
    session["token"] = raw
    session["user"] = user
    session[CSRF_FIELD] = secrets.token_urlsafe(32)
    g._gpulocker_identity = tokens.Identity(user, row.id, tokens.WEB)


def logout_user() -> None:
    """End the web session: the token is revoked and the cookie emptied."""
    identity = current_identity()
    if identity is not None and identity.kind == tokens.WEB:
        tokens.end_web_session(get_ctx().db, identity.token_id)
        forget_tokens()
    session.clear()
    g._gpulocker_identity = None


def csrf_token() -> str:
    """The session's CSRF token (made on first use); put it in every form."""
    token = session.get(CSRF_FIELD)
    if not isinstance(token, str):
        token = secrets.token_urlsafe(32)
        session[CSRF_FIELD] = token
    return token


def verify_csrf(token: str | None) -> bool:
    """Whether `token` is this session's CSRF token (constant-time compare)."""
    expected = session.get(CSRF_FIELD)
    if not isinstance(expected, str) or not token:
        return False
    return hmac.compare_digest(expected.encode(), token.encode())


def check_csrf() -> None:
    """Refuse an unsafe request authenticated by the cookie without the CSRF token
    (from the form field or the X-CSRF-Token header)."""
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return
    identity = current_identity()
    if identity is not None and identity.kind == tokens.API:
        return
    sent = request.headers.get(CSRF_HEADER) or request.form.get(CSRF_FIELD)
    if not verify_csrf(sent):
        raise Forbidden("missing or wrong CSRF token; reload the page and try again")


def _refuse_anonymous() -> Any:
    """Pages send anonymous visitors to the login page; the API answers 401."""
    login_view = current_app.config.get("LOGIN_VIEW")
    if not request.path.startswith("/api/") and login_view in current_app.view_functions:
        return redirect(url_for(login_view, next=request.full_path.rstrip("?")))
    raise Unauthorized("sign in first (session cookie or Authorization: Bearer token)")


def login_required(view: F) -> F:
    """The view needs a signed-in user."""

    @wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if current_user() is None:
            return _refuse_anonymous()
        return view(*args, **kwargs)

    return cast(F, wrapper)


def admin_required(view: F) -> F:
    """The view needs a signed-in admin (PRIVILEGED_USERS)."""

    @wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if current_user() is None:
            return _refuse_anonymous()
        if not is_admin():
            raise Forbidden("only admins can do this")
        return view(*args, **kwargs)

    return cast(F, wrapper)


def client_address() -> str:
    """The client's address, for throttling sign-ins."""
    return request.remote_addr or "unknown"
