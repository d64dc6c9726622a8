"""The core's refusals as HTTP answers: `{"error": {"code", "message"}}` with a 4xx status.

Views never build error responses themselves; they raise the core's exceptions (or let
the core raise them) and this module maps each `code` to its status, in one table.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from gpulocker.errors import GPULockerError

log = logging.getLogger(__name__)

STATUS = {
    "invalid": 422,
    "not_found": 404,
    "forbidden": 403,
    "locked_out": 403,
    "maintenance": 403,
    "not_enough_gpus": 409,
    "conflict": 409,
    "throttled": 429,
    "unauthorized": 401,
}

HTTP_CODES = {
    400: "invalid",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid",
    429: "throttled",
}


class Unauthorized(GPULockerError):
    """Not signed in (no session, no valid token)."""

    code = "unauthorized"


def status_for(exc: GPULockerError) -> int:
    """The HTTP status of a refusal."""
    return STATUS.get(exc.code, 400)


def error_response(
    code: str, message: str, status: int, details: dict[str, Any] | None = None
) -> Response:
    """The one error shape of the API; extra details (e.g. `until`, `free`) ride along."""
    body: dict[str, Any] = {"code": code, "message": message}
    for key, value in (details or {}).items():
        body.setdefault(key, value)
    response = jsonify({"error": body})
    response.status_code = status
    retry_after = (details or {}).get("retry_after")
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="gpulocker"'
    return response


def wants_json() -> bool:
    """API paths always answer JSON; pages get JSON only if they ask for nothing else."""
    if request.path.startswith(("/api/", "/healthz", "/metrics")):
        return True
    best = request.accept_mimetypes.best_match(["text/html", "application/json"])
    return best == "application/json"


def _on_refusal(exc: GPULockerError) -> Response:
    return error_response(exc.code, exc.message, status_for(exc), dict(exc.details))


def _on_http_error(exc: HTTPException) -> Response | HTTPException:
    if not wants_json():
        return exc
    status = exc.code or 500
    code = HTTP_CODES.get(status, "error")
    response = error_response(code, exc.description or exc.name, status)
    if status == 405 and exc.response is None:
        allowed = getattr(exc, "valid_methods", None)
        if allowed:
            response.headers["Allow"] = ", ".join(allowed)
    return response


def _on_crash(exc: Exception) -> Response | tuple[str, int]:
    log.exception("unhandled error on %s %s", request.method, request.path)
    if wants_json():
        return error_response("internal", "internal error; see the server log", 500)
    return "internal error; see the server log", 500


def register(app: Flask) -> None:
    """Install the handlers on the app (every blueprint shares them)."""
    app.register_error_handler(GPULockerError, _on_refusal)
    app.register_error_handler(HTTPException, _on_http_error)
    app.register_error_handler(Exception, _on_crash)
