"""Endpoints declared once: the decorator that validates a request with the models of
`schemas`, and the OpenAPI 3.1 document built from the very same declarations.

A view decorated with `endpoint(...)` receives its parsed `body` / `query` models and
returns a dict (sent as JSON with the declared status) or a Response. Authorization
(`auth="user"`, `"admin"`, `"optional"`, `"public"`) is part of the declaration, so it is
both enforced and documented.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps
from typing import Any, TypeVar

from flask import Blueprint, Response, jsonify, request
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from gpulocker import schemas
from gpulocker.errors import Forbidden, Invalid, NotFound
from gpulocker.untrusted import parse_json
from gpulocker.web import session
from gpulocker.web.errors import Unauthorized

M = TypeVar("M", bound=BaseModel)
AUTH_KINDS = ("public", "optional", "user", "admin")
DESCRIPTIONS = {
    200: "OK",
    201: "created",
    202: "accepted: waiting in line (`wait: true`); the scheduler grants it later",
    401: "not signed in",
    403: "not allowed (not an admin, locked out, maintenance mode, CSRF)",
    404: "no such thing, or not yours",
    409: "not enough free GPUs, or not in a state that allows this",
    422: "invalid input",
    429: "too many failed sign-ins; see Retry-After",
    503: "a dependency is down",
}


@dataclass(frozen=True)
class Operation:
    """One documented endpoint."""

    method: str
    rule: str
    name: str
    summary: str
    auth: str
    status: int
    response: type[BaseModel] | None
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    errors: tuple[int, ...] = ()
    tags: tuple[str, ...] = ()
    media_type: str = "application/json"
    also: tuple[tuple[int, type[BaseModel]], ...] = ()  # other successes: (status, model)

    @property
    def path(self) -> str:
        """The OpenAPI path: `<int:id>` becomes `{id}`."""
        return re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", self.rule)

    @property
    def path_params(self) -> list[tuple[str, str]]:
        """(name, converter) of each path parameter."""
        return [
            (m.group(2), m.group(1) or "string")
            for m in re.finditer(r"<(?:(\w+):)?(\w+)>", self.rule)
        ]

    @property
    def error_statuses(self) -> list[int]:
        """Every 4xx this endpoint can answer."""
        found = set(self.errors)
        if self.auth in ("user", "admin"):
            found |= {401, 403}
        if self.body or self.query or self.path_params:
            found.add(422)
        if self.path_params:
            found.add(404)
        return sorted(found)


OPERATIONS: list[Operation] = []


def endpoint(
    bp: Blueprint,
    method: str,
    rule: str,
    *,
    summary: str,
    response: type[BaseModel] | None,
    auth: str = "user",
    status: int = 200,
    body: type[BaseModel] | None = None,
    query: type[BaseModel] | None = None,
    errors: tuple[int, ...] = (),
    media_type: str = "application/json",
    also: dict[int, type[BaseModel]] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare, document and register one endpoint on `bp`.

    A view answering one of the other successes in `also` ({202: Model}) returns
    `(dict, status)`; any other view returns a dict (sent with `status`) or a Response.
    """
    assert auth in AUTH_KINDS
    full_rule = (bp.url_prefix or "") + rule

    def decorate(view: Callable[..., Any]) -> Callable[..., Any]:
        op = Operation(
            method,
            full_rule,
            view.__name__,
            summary,
            auth,
            status,
            response,
            body,
            query,
            errors,
            (bp.name,),
            media_type,
            tuple((also or {}).items()),
        )
        OPERATIONS.append(op)

        @wraps(view)
        def handler(**path: Any) -> Any:
            _authorize(op)
            kwargs = {**_check_path(path)}
            if body is not None:
                kwargs["body"] = parse_body(body)
            if query is not None:
                kwargs["query"] = parse_query(query)
            result = view(**kwargs)
            if isinstance(result, Response):
                return result
            code = status
            if isinstance(result, tuple):
                result, code = result
                assert code in dict(op.also), f"{view.__name__} did not declare {code}"
            reply = jsonify(result)
            reply.status_code = code
            return reply

        bp.add_url_rule(rule, endpoint=view.__name__, view_func=handler, methods=[method])
        return view

    return decorate


def _authorize(op: Operation) -> None:
    """Enforce the declared `auth`, and CSRF for cookie-authenticated writes."""
    if op.auth in ("public", "optional"):
        return
    if session.current_user() is None:
        raise Unauthorized("sign in first (session cookie or Authorization: Bearer token)")
    if op.auth == "admin" and not session.is_admin():
        raise Forbidden("only admins can do this")
    session.check_csrf()


def _check_path(path: dict[str, Any]) -> dict[str, Any]:
    """Path values the database could not hold are simply not found."""
    for name, value in path.items():
        if isinstance(value, int) and not 0 <= value <= schemas.MAX_ID:
            raise NotFound(f"no such {name}: {value}")
        if isinstance(value, str):
            schemas.check_strings(name, value)
    return path


def parse_body(model: type[M]) -> M:
    """The JSON body as `model`, or Invalid naming each problem."""
    data = parse_json(request.get_data(cache=True)) if request.is_json else None
    if not isinstance(data, dict):
        raise Invalid("the body must be a JSON object (Content-Type: application/json)")
    return schemas.validate(model, data)


def parse_query(model: type[M]) -> M:
    """The query string as `model` (the last value of a repeated key wins)."""
    data = {key: request.args.getlist(key)[-1] for key in request.args}
    return schemas.validate(model, data)


# --- the document -----------------------------------------------------------------------


def document(version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 description of every declared endpoint."""
    models = _models()
    _keys, defs = models_json_schema(models, ref_template="#/components/schemas/{model}")
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "GPULocker API",
            "version": version,
            "description": "Take GPUs of a shared server for a time; the OS then lets only you "
            "open them. Authenticate with `POST /api/v1/tokens` and send "
            "`Authorization: Bearer <token>`.",
        },
        "paths": paths,
        "components": {
            "schemas": defs.get("$defs", {}),
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer"},
                "cookieAuth": {"type": "apiKey", "in": "cookie", "name": "gpulocker_session"},
            },
        },
    }


def _models() -> list[tuple[type[BaseModel], Any]]:
    seen: dict[tuple[type[BaseModel], str], None] = {(schemas.ErrorResponse, "serialization"): None}
    for op in OPERATIONS:
        if op.body is not None:
            seen[(op.body, "validation")] = None
        if op.response is not None:
            seen[(op.response, "serialization")] = None
        for _status, model in op.also:
            seen[(model, "serialization")] = None
    return list(seen)


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _operation(op: Operation) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "operationId": op.name,
        "summary": op.summary,
        "tags": list(op.tags),
        "parameters": _path_parameters(op) + _query_parameters(op),
        "responses": _responses(op),
    }
    if op.body is not None:
        spec["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _ref(op.body)}},
        }
    if op.auth in ("user", "admin", "optional"):
        spec["security"] = [{"bearerAuth": []}, {"cookieAuth": []}]
        if op.auth == "optional":
            spec["security"].append({})
    else:
        spec["security"] = []
    return spec


def _path_parameters(op: Operation) -> list[dict[str, Any]]:
    params = []
    for name, converter in op.path_params:
        schema: dict[str, Any] = (
            {"type": "integer", "minimum": 0, "maximum": schemas.MAX_ID}
            if converter == "int"
            else {"type": "string", "minLength": 1, "maxLength": 64, "pattern": "^[^/]+$"}
        )
        params.append({"name": name, "in": "path", "required": True, "schema": schema})
    return params


def _query_parameters(op: Operation) -> list[dict[str, Any]]:
    if op.query is None:
        return []
    schema = op.query.model_json_schema()
    required = set(schema.get("required", []))
    params = []
    for name, prop in schema.get("properties", {}).items():
        prop = _without_null(dict(prop))
        description = prop.pop("description", None)
        prop.pop("title", None)
        param: dict[str, Any] = {
            "name": name,
            "in": "query",
            "required": name in required,
            "schema": prop,
        }
        if description:
            param["description"] = description
        params.append(param)
    return params


def _without_null(prop: dict[str, Any]) -> dict[str, Any]:
    """An optional query parameter is simply left out; it is never `null`."""
    options = prop.pop("anyOf", None)
    if options is None:
        return prop
    rest = [o for o in options if o.get("type") != "null"]
    prop.pop("default", None)
    if len(rest) == 1:
        return {**prop, **rest[0]}
    return {**prop, "anyOf": rest}


def _responses(op: Operation) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    ok: dict[str, Any] = {"description": DESCRIPTIONS.get(op.status, "OK")}
    if op.response is not None:
        ok["content"] = {op.media_type: {"schema": _ref(op.response)}}
    elif op.media_type != "application/json":
        ok["content"] = {op.media_type: {"schema": {"type": "string"}}}
    responses[str(op.status)] = ok
    for status, model in op.also:
        responses[str(status)] = {
            "description": DESCRIPTIONS.get(status, "OK"),
            "content": {"application/json": {"schema": _ref(model)}},
        }
    for status in op.error_statuses:
        # A 503 (health) answers the same document as the 200, saying what failed.
        model = op.response if status == 503 and op.response else schemas.ErrorResponse
        entry: dict[str, Any] = {
            "description": DESCRIPTIONS.get(status, "error"),
            "content": {"application/json": {"schema": _ref(model)}},
        }
        if status == 429:
            entry["headers"] = {
                "Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}
            }
        responses[str(status)] = entry
    return responses
