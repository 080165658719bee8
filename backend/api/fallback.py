"""Unmatched ``/api/...`` requests answer here, in JSON: 405 with ``Allow`` when the path
exists with other methods, else 404.

Starlette answers 405 itself only when no route matches the path fully; under
``prefloop serve`` the UI is mounted at ``/`` and matches every path, so ``TRACE
/api/v1/votes`` reached the UI and got its 404. This catch-all route, registered after the
API's routes and before any mount, keeps the API's answers the API's. The paths and their
methods come from the OpenAPI document (the routes FastAPI serves).
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI, HTTPException
from starlette.requests import Request
from starlette.routing import Route, compile_path

API_PREFIX = "/api"


class _ApiFallback:
    """An ASGI endpoint (so the route takes every method)."""

    _prefloop_unmatched = True  # RequestContextMiddleware labels it "unmatched" in metrics

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self._paths: list[tuple[re.Pattern[str], set[str]]] | None = None

    def paths(self) -> list[tuple[re.Pattern[str], set[str]]]:
        if self._paths is None:
            out = []
            for path, ops in self.app.openapi().get("paths", {}).items():
                regex, _, _ = compile_path(path)
                out.append((regex, {m.upper() for m in ops}))
            self._paths = out
        return self._paths

    def allowed(self, path: str) -> set[str]:
        allowed: set[str] = set()
        for regex, methods in self.paths():
            if regex.match(path):
                allowed |= methods
        return allowed

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        request = Request(scope, receive)
        allowed = self.allowed(request.url.path)
        if allowed:
            raise HTTPException(
                405, detail="Method Not Allowed", headers={"Allow": ", ".join(sorted(allowed))}
            )
        raise HTTPException(404, detail="Not Found")


def install_api_fallback(app: FastAPI) -> None:
    app.router.routes.append(Route(API_PREFIX + "/{path:path}", _ApiFallback(app)))
