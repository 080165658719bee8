"""Pure ASGI middleware: request id + access log + metrics, and the request-body size limit."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from typing import Any

from starlette.exceptions import HTTPException

from backend.api.errors import error_body
from backend.observability import Metrics, request_id_var

log = logging.getLogger("prefloop.access")
log_errors = logging.getLogger("prefloop.errors")

_SAFE_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

Scope = dict[str, Any]


def route_template(scope: Scope) -> str:
    """The matched route as a template (``/api/v1/rounds/{round_id}``): the path with each
    path-parameter segment put back as ``{name}``; ``unmatched`` for 404s."""
    endpoint = scope.get("endpoint")
    if endpoint is None or getattr(endpoint, "_prefloop_unmatched", False):  # api/fallback.py
        return "unmatched"
    params = {str(v): k for k, v in (scope.get("path_params") or {}).items()}
    if not params:
        return str(scope["path"])
    return "/".join(
        "{" + params[seg] + "}" if seg in params else seg for seg in scope["path"].split("/")
    )


class BodyTooLarge(HTTPException):
    """Raised from ``receive``; FastAPI re-raises HTTPExceptions from body parsing, so the
    app's handler renders it as a JSON 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(status_code=413, detail=f"request body too large (limit {limit} bytes)")


class RequestContextMiddleware:
    """Assigns ``X-Request-ID`` (kept from the client when well-formed), logs one JSON line per
    request, and records Prometheus counters and latency under the route template.

    An unhandled exception is answered here, inside the request's context: a 500 whose body
    and ``X-Request-ID`` header carry the id that its logged traceback and access line carry.
    """

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = None
        for k, v in scope.get("headers", ()):
            if k == b"x-request-id":
                candidate = v.decode("latin-1")
                rid = candidate if _SAFE_ID.match(candidate) else None
                break
        rid = rid or os.urandom(16).hex()  # 32 hex digits, like uuid4().hex, cheaper
        token = request_id_var.set(rid)
        status = 500
        start = time.perf_counter()

        started = False

        async def send_wrapper(message: dict[str, Any]) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:
            log_errors.exception("unhandled error on %s %s", scope["method"], scope["path"])
            if started:
                raise
            body = json.dumps(error_body(500, "internal server error")).encode()
            await send_wrapper(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send_wrapper({"type": "http.response.body", "body": body})
        finally:
            elapsed = time.perf_counter() - start
            template = route_template(scope)
            method = scope["method"]
            self.metrics.observe_request(method, template, status, elapsed)
            if log.isEnabledFor(logging.INFO):
                log.info(
                    "%s %s %s",
                    method,
                    scope["path"],
                    status,
                    extra={
                        "method": method,
                        "path": scope["path"],
                        "route": template,
                        "status": status,
                        "duration_ms": round(elapsed * 1000, 2),
                    },
                )
            request_id_var.reset(token)


class BodySizeLimitMiddleware:
    """Rejects a request body over ``max_bytes`` with 413, whether announced by
    ``Content-Length`` or discovered while streaming (then the handler's read raises and no
    transaction commits)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _reject(self, send: Any) -> None:
        body = json.dumps(
            {"detail": f"request body too large (limit {self.max_bytes} bytes)"}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for k, v in scope.get("headers", ()):
            if k == b"content-length":
                try:
                    declared = int(v)
                except ValueError:
                    declared = -1
                if declared > self.max_bytes:
                    await self._reject(send)
                    return
                break
        received = 0
        started = False

        async def limited_receive() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._reject(send)
