"""The web application: JSON API, health, metrics and (when present) the HTML pages.

`create_app()` is the factory every server uses (`wsgi.py`, `gpulocker serve/web`,
tests). It opens one Context per process and keeps it in `app.extensions["gpulocker"]`;
views reach it through `gpulocker.web.session.get_ctx()`.
"""

from __future__ import annotations

import importlib.util
from datetime import timedelta

from flask import Flask, Response, request

from gpulocker import tokens
from gpulocker.config import Settings, load_settings, resolve_secret_key
from gpulocker.context import Context, open_context
from gpulocker.web import errors, session
from gpulocker.web.status_cache import CHANGES, STATUS_CACHE, ChangeCounter, StatusCache

MAX_BODY_BYTES = 1024 * 1024
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def create_app(settings: Settings | None = None, ctx: Context | None = None) -> Flask:
    """Build the app on `ctx` (or a Context opened on `settings`, or on the environment)."""
    if ctx is None:
        ctx = open_context(settings or load_settings())
    settings = ctx.settings
    app = Flask(__name__)
    secure = bool(settings.ssl_cert) or settings.trusted_proxy
    app.config.update(
        SECRET_KEY=resolve_secret_key(settings),
        # Behind TLS (or a TLS proxy) the cookie is Secure and host-only (__Host-: no Domain,
        # Path=/), so a plain-HTTP service on another port of the same host never receives it.
        SESSION_COOKIE_NAME="__Host-gpulocker_session" if secure else "gpulocker_session",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=secure,
        SESSION_COOKIE_PATH="/",
        PERMANENT_SESSION_LIFETIME=timedelta(hours=tokens.WEB_SESSION_HOURS),
        # The cookie is sent back only when the session changes. Re-sent with every answer,
        # a page's poll (queue.js, schedule.js) answered after a form's redirect put back
        # the session as it was before, and the form's flash message was lost. The session
        # ends with its server-side token anyway (WEB_SESSION_HOURS from sign-in).
        SESSION_REFRESH_EACH_REQUEST=False,
        MAX_CONTENT_LENGTH=MAX_BODY_BYTES,
        LOGIN_VIEW="pages.login",
    )
    if settings.trusted_proxy:  # the proxy's X-Forwarded-For/-Proto say who asked, over what
        from werkzeug.middleware.proxy_fix import ProxyFix

        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1, x_proto=1, x_host=1)  # type: ignore[method-assign]
    app.extensions["gpulocker"] = ctx
    changes = app.extensions[CHANGES] = ChangeCounter()
    app.extensions[STATUS_CACHE] = StatusCache(changes)

    @app.after_request
    def note_changes(response: Response) -> Response:
        """A successful write through this server invalidates the caches of every worker."""
        if request.method not in SAFE_METHODS and response.status_code < 400:
            changes.bump()
        return response

    app.jinja_env.globals.update(
        csrf_token=session.csrf_token,
        current_user=session.current_user,
        is_admin=session.is_admin,
    )
    errors.register(app)
    _register_blueprints(app)
    return app


def _register_blueprints(app: Flask) -> None:
    """The API, health and metrics always; the pages (`web/pages.py`, `bp`) when shipped."""
    from gpulocker.web import api, api_scheduling, health, records_api

    app.register_blueprint(api.bp)
    app.register_blueprint(records_api.bp)
    app.register_blueprint(api_scheduling.bp)
    app.register_blueprint(health.bp)
    health.install_request_counter(app)
    if importlib.util.find_spec("gpulocker.web.pages") is not None:
        from gpulocker.web import pages

        app.register_blueprint(pages.bp)
