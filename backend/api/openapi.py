"""The OpenAPI document, with every error status each operation can return, all with one
schema.

Errors are ``ErrorPublic``: ``{"detail": <string or list of {loc, msg, type}>}``, plus
``request_id`` on a 5xx (:mod:`backend.api.errors`). Which statuses an operation can return
follows from what FastAPI already put in the document, so a new route is declared correctly
without a list to keep in sync:

- a bearer token (a ``security`` requirement): 401, and 403 (banned account, admin role);
- a path parameter, or a parameter or body field naming another resource (``..._id``): 404
  (the resource is unknown);
- any parameter or request body: 422; a request body that cannot be parsed at all: 400;
- a request body (POST, PUT, PATCH, DELETE): 413 above ``PREFLOOP_MAX_UPLOAD_BYTES``, and
  409 (a conflict of state, or a concurrent request that won a unique constraint) unless
  the route is flagged :data:`READS_ONLY`;
- every ``/api/`` operation reads the database: 503 with ``Retry-After`` while it is down.

Statuses particular to one route (415, 429, a 401 at login) are declared on the route
(``responses=``); this module gives them the error schema too.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field

_WRITE_METHODS = {"post", "put", "patch", "delete"}
#: ``openapi_extra`` flag of a POST that writes nothing (login): no 409.
READS_ONLY = "x-reads-only"


class ValidationErrorItem(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ErrorPublic(BaseModel):
    """Every error body."""

    detail: str | list[ValidationErrorItem] = Field(
        description="What went wrong: a sentence, or the invalid fields (422)."
    )
    request_id: str | None = Field(
        None, description="5xx only: the X-Request-ID of the request, as in its log lines."
    )


DESCRIPTIONS = {
    400: "Bad request.",
    401: "Missing, invalid or expired bearer token (or wrong credentials).",
    403: "Not allowed: banned account, or admin role required.",
    404: "Not found.",
    409: "Conflicts with the current state or with a concurrent request.",
    413: "Request body too large.",
    415: "Unsupported media type.",
    422: "Invalid input; the detail names the field.",
    429: "Too many requests; see Retry-After.",
    503: "Database temporarily unavailable; see Retry-After.",
}


def _body_fields(op: dict[str, Any], schemas: dict[str, Any]) -> set[str]:
    schema = op.get("requestBody", {}).get("content", {}).get("application/json", {})
    schema = schema.get("schema", {})
    out: set[str] = set()
    for option in schema.get("anyOf", [schema]):  # an optional body: anyOf [model, null]
        ref = option.get("$ref", "")
        if ref.startswith("#/components/schemas/"):
            option = schemas.get(ref.rsplit("/", 1)[1], {})
        out |= set(option.get("properties", {}))
    return out


def operation_error_statuses(
    path: str, method: str, op: dict[str, Any], schemas: dict[str, Any] | None = None
) -> set[int]:
    """The error statuses of one operation of the document (see the module doc)."""
    codes = {int(c) for c in op.get("responses", {}) if c.isdigit() and int(c) >= 400}
    params = op.get("parameters", [])
    if op.get("security"):
        codes |= {401, 403}
    names = {p.get("name", "") for p in params} | _body_fields(op, schemas or {})
    if any(p.get("in") == "path" for p in params) or any(n.endswith("_id") for n in names):
        codes.add(404)
    if params or "requestBody" in op:
        codes.add(422)
    if "requestBody" in op:
        codes.add(400)  # a body that cannot be parsed at all (not JSON, not a form)
    if method in _WRITE_METHODS:
        codes.add(413)
        if not op.get(READS_ONLY):
            codes.add(409)
    if path.startswith("/api/"):
        codes.add(503)
    return codes


_GENERIC = {"#/components/schemas/Message", "#/components/schemas/HTTPValidationError"}


def _replaceable(content: dict[str, Any] | None) -> bool:
    """No body declared, or a generic error one: it becomes ``ErrorPublic``."""
    if not content:
        return True
    ref = content.get("application/json", {}).get("schema", {}).get("$ref")
    return ref in _GENERIC


def _error_ref() -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorPublic"}}}


def build_openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document with the error responses of every route filled in."""
    spec = get_openapi(
        title=app.title,
        version=app.version,
        description=app.description,
        routes=app.routes,
    )
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    for model in (ErrorPublic, ValidationErrorItem):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schema.pop("$defs", None)
        schemas[model.__name__] = schema
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    for path, ops in spec.get("paths", {}).items():
        for method, op in ops.items():
            responses = op.setdefault("responses", {})
            for code in sorted(operation_error_statuses(path, method, op, schemas)):
                entry = responses.setdefault(str(code), {})
                entry.setdefault("description", DESCRIPTIONS.get(code, "Error."))
                if _replaceable(entry.get("content")):
                    entry["content"] = _error_ref()
                if code in (429, 503):
                    entry.setdefault("headers", {})["Retry-After"] = {
                        "description": "Seconds to wait before retrying.",
                        "schema": {"type": "integer"},
                    }
    return spec


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
