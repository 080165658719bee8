"""Errors services raise; the API maps each to its status code (see backend.api.errors)."""

from __future__ import annotations


class ServiceError(Exception):
    status_code = 400

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers


class NotFound(ServiceError):
    status_code = 404


class Conflict(ServiceError):
    status_code = 409


class Forbidden(ServiceError):
    status_code = 403


class Invalid(ServiceError):
    status_code = 422


class LimitReached(ServiceError):
    status_code = 429


class Unauthorized(ServiceError):
    """401: the token's user no longer exists, or the token predates its ``token_version``."""

    status_code = 401

    def __init__(self, detail: str = "invalid or expired token") -> None:
        super().__init__(detail, headers={"WWW-Authenticate": "Bearer"})
