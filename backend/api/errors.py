"""Every error is JSON ``{"detail": ...}`` with the right status code.

- ``HTTPException``: its status and detail.
- ``RequestValidationError``: 422 with a JSON-safe list of ``{loc, msg, type}``.
- :class:`~backend.services.errors.ServiceError`: its ``status_code`` (404, 409, 422, 429...).
- ``IntegrityError`` (a concurrent request won a unique constraint): 409.
- ``OperationalError`` (database unavailable or locked too long): 503 with ``Retry-After``.
- anything else: 500 ``{"detail": "internal server error", "request_id": ...}``, logged with
  its traceback by :class:`~backend.api.middleware.RequestContextMiddleware` (inside the
  request's context, so the log line and the ``X-Request-ID`` header carry the same id).

Every 5xx body carries ``request_id`` (:func:`error_response`).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import IntegrityError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from backend.observability import request_id_var
from backend.services.errors import ServiceError

log = logging.getLogger("prefloop.errors")


def _json_safe_errors(errors: Any) -> list[dict[str, Any]]:
    out = []
    for e in errors:
        out.append(
            {
                "loc": [p if isinstance(p, int | str) else str(p) for p in e.get("loc", ())],
                "msg": str(e.get("msg", "")),
                "type": str(e.get("type", "")),
            }
        )
    return out


def error_body(status_code: int, detail: Any) -> dict[str, Any]:
    """``{"detail": ...}``, plus the request id on a 5xx (to match it with its log line)."""
    if status_code >= 500:
        return {"detail": detail, "request_id": request_id_var.get()}
    return {"detail": detail}


def error_response(
    status_code: int, detail: Any, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(status_code, detail), status_code=status_code, headers=headers)


async def http_exception_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error_response(exc.status_code, exc.detail, getattr(exc, "headers", None))


async def validation_exception_handler(
    request: Request, exc: RequestValidationError
) -> JSONResponse:
    from backend.api.deps import recheck_user_before_422

    # Hot-path endpoints check the user row after validation; answer as if before it.
    auth_error = await recheck_user_before_422(request)
    if auth_error is not None:
        return await http_exception_handler(request, auth_error)
    return error_response(422, _json_safe_errors(exc.errors()))


async def service_error_handler(request: Request, exc: ServiceError) -> JSONResponse:
    return error_response(exc.status_code, exc.detail, exc.headers)


async def integrity_error_handler(request: Request, exc: IntegrityError) -> JSONResponse:
    log.info("integrity error: %s", exc.orig)
    return error_response(409, "conflicts with existing data")


async def operational_error_handler(request: Request, exc: OperationalError) -> JSONResponse:
    log.error("database error: %s", exc.orig)
    return error_response(503, "database temporarily unavailable", {"Retry-After": "1"})


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(StarletteHTTPException, http_exception_handler)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, validation_exception_handler)  # type: ignore[arg-type]
    app.add_exception_handler(ServiceError, service_error_handler)  # type: ignore[arg-type]
    app.add_exception_handler(IntegrityError, integrity_error_handler)  # type: ignore[arg-type]
    app.add_exception_handler(OperationalError, operational_error_handler)  # type: ignore[arg-type]
    # Anything else: RequestContextMiddleware answers 500 (see the module doc).
