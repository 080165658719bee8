"""Prefloop's typed v1 HTTP client (:mod:`prefloop_client.api`) and the operator CLI on it
(:mod:`prefloop_client.cli`). Depends on ``httpx`` only."""

from prefloop_client.api import (
    API_PREFIX,
    CHOICES,
    ApiError,
    ApiUnavailable,
    Choice,
    Conflict,
    ExportFormat,
    Forbidden,
    ImageRef,
    NoPairReady,
    NotFound,
    Pair,
    PrefloopClient,
    RateLimited,
    Unauthorized,
    VoteReceipt,
    normalize_base_url,
)

__all__ = [
    "API_PREFIX",
    "CHOICES",
    "ApiError",
    "ApiUnavailable",
    "Choice",
    "Conflict",
    "ExportFormat",
    "Forbidden",
    "ImageRef",
    "NoPairReady",
    "NotFound",
    "Pair",
    "PrefloopClient",
    "RateLimited",
    "Unauthorized",
    "VoteReceipt",
    "normalize_base_url",
]
