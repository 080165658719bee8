"""The typed HTTP client for Prefloop's v1 API: the one client every program uses.

The UI (:mod:`ui`), the operator CLI (:mod:`prefloop_client.cli`), the demo and the simulated
annotators (:mod:`clients`) and the load benchmark talk to the server through it, over HTTP,
exactly like any external client would. It depends on ``httpx`` only: nothing from ``backend/``
or ``worker/``.

Errors are mapped onto a small hierarchy so that a caller can react to each case:

- :class:`ApiUnavailable`: the API could not be reached (connection refused, timeout).
- :class:`ApiError` with a subclass per status callers treat differently:
  401 :class:`Unauthorized`, 403 :class:`Forbidden`, 404 :class:`NotFound`,
  409 :class:`Conflict`, 429 :class:`RateLimited`. Anything else stays a plain
  :class:`ApiError` with its status code and the API's ``detail`` text.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx

API_PREFIX = "/api/v1"

Choice = Literal["left", "right", "tie", "both_bad", "skip"]
CHOICES: tuple[Choice, ...] = ("left", "right", "tie", "both_bad", "skip")
ExportFormat = Literal["pickapic", "jsonl"]

#: Used when a 204 from ``/pairs/next`` carries no (or an unreadable) Retry-After header.
DEFAULT_RETRY_AFTER_S = 2.0


class ApiUnavailable(Exception):
    """The API could not be reached at all (connection error or timeout)."""


class ApiError(Exception):
    """The API answered with an error status.

    Attributes:
        status_code: the HTTP status.
        detail: the API's ``detail`` field, rendered as text (validation errors are joined).
    """

    def __init__(self, status_code: int, detail: str, retry_after_s: float | None = None) -> None:
        super().__init__(f"HTTP {status_code}: {detail}")
        self.status_code = status_code
        self.detail = detail
        #: the ``Retry-After`` header in seconds, when the API sent one (429, 503).
        self.retry_after_s = retry_after_s


class Unauthorized(ApiError):
    """401: missing, wrong or expired credentials."""


class Forbidden(ApiError):
    """403: signed in, but not allowed (for example an annotator on an admin endpoint)."""


class NotFound(ApiError):
    """404: unknown id (pair, round, version, image)."""


class Conflict(ApiError):
    """409: for a vote, a contradicting vote by the same annotator on the same pair."""


class RateLimited(ApiError):
    """429: a per-user limit was reached."""


_ERRORS_BY_STATUS: dict[int, type[ApiError]] = {
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    429: RateLimited,
}


@dataclass(frozen=True)
class ImageRef:
    """One side of a pair: the image id and the URL the API serves its bytes at."""

    image_id: str
    url: str


@dataclass(frozen=True)
class Pair:
    """A pair ready to be judged, as ``GET /pairs/next`` returns it (sides already shuffled)."""

    pair_id: str | int
    prompt: str
    left: ImageRef
    right: ImageRef


@dataclass(frozen=True)
class VoteReceipt:
    """The API's answer to a vote: its id, and whether it repeated an already stored vote."""

    vote_id: Any
    duplicate: bool


@dataclass(frozen=True)
class NoPairReady:
    """``GET /pairs/next`` answered 204: nothing to judge yet; ask again after ``retry_after_s``."""

    retry_after_s: float


def normalize_base_url(api_base_url: str) -> str:
    """Return the server root for ``api_base_url``.

    Accepts both the server root (``http://host:8000``) and the versioned prefix
    (``http://host:8000/api/v1``), with or without a trailing slash.
    """
    url = api_base_url.strip().rstrip("/")
    if not url:
        raise ValueError("api_base_url is empty")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"api_base_url must be an http(s) URL, got {api_base_url!r}")
    if url.endswith(API_PREFIX):
        url = url[: -len(API_PREFIX)]
    return url


def _detail_text(response: httpx.Response) -> str:
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        text = response.text.strip()
        return text[:300] if text else response.reason_phrase
    detail = body.get("detail", body) if isinstance(body, dict) else body
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list):
        # FastAPI validation errors: [{"loc": [...], "msg": "...", ...}, ...]
        messages = []
        for item in detail:
            if isinstance(item, dict) and "msg" in item:
                loc = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
                messages.append(f"{loc}: {item['msg']}" if loc else str(item["msg"]))
            else:
                messages.append(str(item))
        return "; ".join(messages)
    return json.dumps(detail)


def _parse_retry_after(value: str | None) -> float:
    if value is None:
        return DEFAULT_RETRY_AFTER_S
    try:
        seconds = float(value)
    except ValueError:
        return DEFAULT_RETRY_AFTER_S
    return seconds if seconds > 0 else DEFAULT_RETRY_AFTER_S


def parse_pair(body: Mapping[str, Any]) -> Pair:
    """A ``GET /pairs/next`` body as a :class:`Pair` (:class:`ApiError` when malformed)."""
    try:
        return Pair(
            pair_id=body["pair_id"],
            prompt=str(body["prompt"]),
            left=ImageRef(image_id=str(body["left"]["image_id"]), url=str(body["left"]["url"])),
            right=ImageRef(image_id=str(body["right"]["image_id"]), url=str(body["right"]["url"])),
        )
    except (KeyError, TypeError) as exc:
        raise ApiError(200, f"unexpected pair payload from the API: {exc!r}") from exc


def vote_payload(
    pair_id: str | int,
    choice: Choice,
    client_vote_id: str | None = None,
    latency_ms: float | None = None,
) -> dict[str, Any]:
    """The JSON body of ``POST /votes`` (a client that brings its own transport, such as the
    asyncio load benchmark, builds it here too)."""
    if choice not in CHOICES:
        raise ValueError(f"choice must be one of {CHOICES}, got {choice!r}")
    payload: dict[str, Any] = {"pair_id": pair_id, "choice": choice}
    if client_vote_id is not None:
        payload["client_vote_id"] = client_vote_id
    if latency_ms is not None:
        payload["latency_ms"] = max(0, int(latency_ms))
    return payload


class PrefloopClient:
    """Synchronous client for one API server; thread-safe (one pooled ``httpx.Client``).

    Every call takes the caller's bearer token explicitly, so one client serves all the
    signed-in users of a UI process.
    """

    def __init__(
        self,
        api_base_url: str,
        *,
        timeout_s: float = 15.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = normalize_base_url(api_base_url)
        self._origin = urlsplit(self.base_url)._replace(path="", query="", fragment="")
        self._http = httpx.Client(
            base_url=self.base_url,
            timeout=timeout_s,
            transport=transport,
            follow_redirects=False,
            headers={"Accept": "application/json"},
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> PrefloopClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def healthy(self) -> bool:
        """Whether ``GET /healthz`` answers 200 (False when unreachable or unhealthy)."""
        try:
            return self._http.get("/healthz", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    # -- plumbing -----------------------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        expected: Sequence[int] = (200,),
        **kwargs: Any,
    ) -> httpx.Response:
        headers = dict(kwargs.pop("headers", None) or {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        try:
            response = self._http.request(method, path, headers=headers, **kwargs)
        except httpx.TimeoutException as exc:
            raise ApiUnavailable(f"the API at {self.base_url} did not answer in time") from exc
        except httpx.TransportError as exc:
            raise ApiUnavailable(f"cannot reach the API at {self.base_url}: {exc}") from exc
        if response.status_code in expected:
            return response
        error_cls = _ERRORS_BY_STATUS.get(response.status_code, ApiError)
        retry_after = response.headers.get("Retry-After")
        raise error_cls(
            response.status_code,
            _detail_text(response),
            _parse_retry_after(retry_after) if retry_after is not None else None,
        )

    @staticmethod
    def _json(response: httpx.Response) -> Any:
        try:
            return response.json()
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
            raise ApiError(response.status_code, "the API returned a non-JSON body") from exc

    def _same_origin(self, url: str) -> bool:
        parts = urlsplit(url)
        if not parts.scheme:
            return True
        return (parts.scheme, parts.netloc) == (self._origin.scheme, self._origin.netloc)

    # -- authentication ------------------------------------------------------------------------

    def login(self, username: str, password: str) -> str:
        """OAuth2 password flow; returns the bearer access token."""
        response = self._request(
            "POST",
            f"{API_PREFIX}/auth/token",
            data={"username": username, "password": password},
        )
        body = self._json(response)
        token = body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise ApiError(response.status_code, "the token response has no access_token")
        return token

    def register(self, username: str, password: str) -> dict[str, Any]:
        """Open sign-up. Raises :class:`Forbidden` (or :class:`NotFound`) when it is closed."""
        response = self._request(
            "POST",
            f"{API_PREFIX}/auth/register",
            json={"username": username, "password": password},
            expected=(200, 201),
        )
        body = self._json(response)
        return body if isinstance(body, dict) else {}

    def me(self, token: str) -> dict[str, Any]:
        """The signed-in user's own record (``GET /users/me``)."""
        body = self._json(self._request("GET", f"{API_PREFIX}/users/me", token=token))
        if not isinstance(body, dict):
            raise ApiError(200, "unexpected /users/me payload")
        return body

    # -- annotation ------------------------------------------------------------------------------

    def next_pair(self, token: str) -> Pair | NoPairReady:
        response = self._request(
            "GET", f"{API_PREFIX}/pairs/next", token=token, expected=(200, 204)
        )
        if response.status_code == 204:
            return NoPairReady(_parse_retry_after(response.headers.get("Retry-After")))
        body = self._json(response)
        if not isinstance(body, dict):
            raise ApiError(200, "unexpected pair payload from the API")
        return parse_pair(body)

    def image_bytes(self, token: str, image: ImageRef) -> tuple[bytes, str]:
        """Fetch an image's bytes; returns ``(content, content_type)``.

        The bearer token is sent only to the API's own origin.
        """
        url = image.url or f"{API_PREFIX}/images/{image.image_id}"
        response = self._request(
            "GET",
            url,
            token=token if self._same_origin(url) else None,
            headers={"Accept": "image/*"},
        )
        content_type = response.headers.get("Content-Type", "application/octet-stream")
        return response.content, content_type.split(";")[0].strip().lower()

    def vote(
        self,
        token: str,
        *,
        pair_id: str | int,
        choice: Choice,
        client_vote_id: str | None = None,
        latency_ms: int | None = None,
    ) -> VoteReceipt:
        """Submit a vote. Safe to repeat with the same ``client_vote_id`` (counted once)."""
        payload = vote_payload(pair_id, choice, client_vote_id, latency_ms)
        response = self._request(
            "POST", f"{API_PREFIX}/votes", token=token, json=payload, expected=(200, 201)
        )
        body = self._json(response)
        if not isinstance(body, dict):
            raise ApiError(response.status_code, "unexpected vote payload from the API")
        # 200 means "this repeated a stored vote" when the API does not say it explicitly.
        duplicate = bool(body.get("duplicate", response.status_code == 200))
        return VoteReceipt(vote_id=body.get("vote_id"), duplicate=duplicate)

    def my_stats(self, token: str) -> dict[str, Any]:
        """The signed-in user's own progress (``me`` of ``GET /stats``): votes, votes_today."""
        me = self.stats(token).get("me")
        return me if isinstance(me, dict) else {}

    # -- admin ---------------------------------------------------------------------------------

    def stats(self, token: str) -> dict[str, Any]:
        body = self._json(self._request("GET", f"{API_PREFIX}/stats", token=token))
        return body if isinstance(body, dict) else {"stats": body}

    def list_rounds(
        self, token: str, *, status: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """Rounds, newest first; ``status`` filters (queued, running, succeeded, ...)."""
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        return _as_list(
            self._json(self._request("GET", f"{API_PREFIX}/rounds", token=token, params=params))
        )

    def get_round(self, token: str, round_id: str | int) -> dict[str, Any]:
        return self._object(self._request("GET", f"{API_PREFIX}/rounds/{round_id}", token=token))

    def round_config_defaults(
        self, token: str, parent_version_id: int | None = None
    ) -> dict[str, Any]:
        """``{"base_model": ..., "config": {...}}``: the config a round gets with no overrides."""
        params = {"parent_version_id": parent_version_id} if parent_version_id else None
        return self._object(
            self._request("GET", f"{API_PREFIX}/rounds/config-defaults", token=token, params=params)
        )

    def round_config_schema(self, token: str) -> dict[str, Any]:
        """The JSON Schema of a round's config (field types, bounds, descriptions)."""
        return self._object(self._request("GET", f"{API_PREFIX}/rounds/config-schema", token=token))

    def credit_curve(
        self,
        token: str,
        scheme: str = "dde",
        *,
        base_model: str | None = None,
        points: int | None = None,
    ) -> dict[str, Any]:
        """A credit scheme over the base model's timesteps (default: the serving version's),
        for a plot: ``{"scheme", "base_model", "num_train_timesteps", "timesteps", "weight"
        (mean-1 credit W), "density" (W / sum W)}`` with at most ``points`` points. An unknown
        scheme is a 422 naming the known ones; a base model without a scheduler config a 404."""
        params: dict[str, Any] = {"scheme": scheme}
        if base_model is not None:
            params["base_model"] = base_model
        if points is not None:
            params["points"] = points
        return self._object(
            self._request("GET", f"{API_PREFIX}/rounds/credit", token=token, params=params)
        )

    def start_round(
        self,
        token: str,
        config: Mapping[str, Any] | None = None,
        *,
        parent_version_id: int | None = None,
    ) -> Any:
        """Queue a training round (202); returns its ``round_id``. A bad config value is a
        422 (:class:`ApiError`) whose ``detail`` names the field (``config.beta: ...``)."""
        payload: dict[str, Any] = {}
        if config:
            payload["config"] = dict(config)
        if parent_version_id is not None:
            payload["parent_version_id"] = parent_version_id
        response = self._request(
            "POST",
            f"{API_PREFIX}/rounds",
            token=token,
            json=payload,
            expected=(200, 201, 202),
        )
        body = self._json(response)
        return body.get("round_id") if isinstance(body, dict) else None

    def cancel_round(self, token: str, round_id: str | int) -> dict[str, Any]:
        response = self._request(
            "POST",
            f"{API_PREFIX}/rounds/{round_id}/cancel",
            token=token,
            expected=(200, 202),
        )
        body = self._json(response)
        return body if isinstance(body, dict) else {}

    def list_versions(
        self, token: str, *, status: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        return _as_list(
            self._json(self._request("GET", f"{API_PREFIX}/versions", token=token, params=params))
        )

    def get_version(self, token: str, version_id: str | int) -> dict[str, Any]:
        return self._object(
            self._request("GET", f"{API_PREFIX}/versions/{version_id}", token=token)
        )

    def version_ab(self, token: str, version_id: str | int) -> dict[str, Any]:
        """The version's blind A/B tests against its parent (``gate`` and ``live``)."""
        return self._object(
            self._request("GET", f"{API_PREFIX}/versions/{version_id}/ab", token=token)
        )

    def version_samples(self, token: str, version_id: str | int) -> dict[str, Any]:
        """The version's validation grid: ``prompts`` (parent_url / candidate_url each) and
        ``grid_url``. :class:`NotFound` when the version has no validation samples."""
        return self._object(
            self._request("GET", f"{API_PREFIX}/versions/{version_id}/samples", token=token)
        )

    def rollback_version(
        self, token: str, version_id: str | int, reason: str | None = None
    ) -> dict[str, Any]:
        """Publish the serving version's parent again (409 when ``version_id`` is not the
        serving version, or has no parent)."""
        return self._version_action(
            token, version_id, "rollback", {"reason": reason} if reason else None
        )

    def publish_version(self, token: str, version_id: str | int) -> dict[str, Any]:
        return self._version_action(token, version_id, "publish")

    def retire_version(self, token: str, version_id: str | int) -> dict[str, Any]:
        return self._version_action(token, version_id, "retire")

    def _version_action(
        self,
        token: str,
        version_id: str | int,
        action: str,
        body: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        response = self._request(
            "POST",
            f"{API_PREFIX}/versions/{version_id}/{action}",
            token=token,
            json=dict(body) if body is not None else None,
            expected=(200, 202),
        )
        result = self._json(response)
        return result if isinstance(result, dict) else {}

    def _object(self, response: httpx.Response) -> dict[str, Any]:
        body = self._json(response)
        if not isinstance(body, dict):
            raise ApiError(response.status_code, "the API returned a non-object JSON body")
        return body

    def leaderboard(self, token: str) -> list[dict[str, Any]]:
        return _as_list(self._json(self._request("GET", f"{API_PREFIX}/leaderboard", token=token)))

    def upload_prompts(
        self, token: str, filename: str, content: bytes, content_type: str
    ) -> dict[str, Any]:
        """Upload a CSV / JSONL / TXT prompt file (multipart field ``file``)."""
        response = self._request(
            "POST",
            f"{API_PREFIX}/prompts",
            token=token,
            files={"file": (filename, content, content_type)},
            expected=(200, 201),
        )
        body = self._json(response)
        return body if isinstance(body, dict) else {"result": body}

    def add_prompts(self, token: str, prompts: Sequence[str | Mapping[str, Any]]) -> dict[str, Any]:
        """Add prompts from a JSON list of strings or ``{text, source}`` objects."""
        response = self._request(
            "POST",
            f"{API_PREFIX}/prompts",
            token=token,
            json=[p if isinstance(p, str) else dict(p) for p in prompts],
            expected=(200, 201),
        )
        body = self._json(response)
        return body if isinstance(body, dict) else {"result": body}

    def list_prompts(
        self, token: str, *, active: bool | None = None, limit: int = 100, offset: int = 0
    ) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if active is not None:
            params["active"] = "true" if active else "false"
        return _as_list(
            self._json(self._request("GET", f"{API_PREFIX}/prompts", token=token, params=params))
        )

    def set_prompt_active(self, token: str, prompt_id: int, active: bool) -> dict[str, Any]:
        """Activate or deactivate a prompt (the pool draws new images for active ones only)."""
        return self._object(
            self._request(
                "PATCH", f"{API_PREFIX}/prompts/{prompt_id}", token=token, json={"active": active}
            )
        )

    def list_users(self, token: str, *, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        """Annotators with their volume and reliability (admin); ``limit`` is at most 500."""
        params = {"limit": limit, "offset": offset}
        return _as_list(
            self._json(self._request("GET", f"{API_PREFIX}/users", token=token, params=params))
        )

    def create_user(
        self,
        token: str,
        username: str,
        password: str,
        *,
        role: Literal["annotator", "admin"] = "annotator",
    ) -> dict[str, Any]:
        """Create an account (admin); :class:`Conflict` when the username is taken."""
        return self._object(
            self._request(
                "POST",
                f"{API_PREFIX}/users",
                token=token,
                json={"username": username, "password": password, "role": role},
                expected=(200, 201),
            )
        )

    def update_user(self, token: str, user_id: int, **changes: Any) -> dict[str, Any]:
        """``PATCH /users/{id}``: status, role, daily_cap, weekly_cap or password."""
        return self._object(
            self._request("PATCH", f"{API_PREFIX}/users/{user_id}", token=token, json=changes)
        )

    def ban_user(self, token: str, user_id: int) -> dict[str, Any]:
        """Ban an account: its every later request is refused with 403."""
        return self.update_user(token, user_id, status="banned")

    def shadow_ban_user(self, token: str, user_id: int) -> dict[str, Any]:
        """Shadow-ban an account: it keeps voting, and its votes never train or count."""
        return self.update_user(token, user_id, status="shadow_banned")

    def unban_user(self, token: str, user_id: int) -> dict[str, Any]:
        return self.update_user(token, user_id, status="active")

    def round_metrics(self, token: str, round_id: str | int) -> list[dict[str, Any]]:
        """The logged training steps of a round (loss curves)."""
        return _as_list(
            self._json(self._request("GET", f"{API_PREFIX}/rounds/{round_id}/metrics", token=token))
        )

    def export(self, token: str, fmt: ExportFormat) -> tuple[bytes, str, str | None]:
        """Download the dataset export; returns ``(content, content_type, filename)``."""
        response = self._request(
            "GET",
            f"{API_PREFIX}/export",
            token=token,
            params={"format": fmt},
            headers={"Accept": "*/*"},
        )
        content_type = response.headers.get("Content-Type", "application/octet-stream")
        return response.content, content_type.split(";")[0].strip(), _filename(response)

    def import_dataset(self, token: str, filename: str, content: bytes) -> dict[str, Any]:
        """Import a Pick-a-Pic parquet file as pairs with votes (all or nothing)."""
        return self._object(
            self._request(
                "POST",
                f"{API_PREFIX}/import",
                token=token,
                files={"file": (filename, content, "application/vnd.apache.parquet")},
                expected=(200, 201),
            )
        )


def _as_list(body: Any) -> list[dict[str, Any]]:
    """Accept the API's ``{"data": [...], "count": n}`` pages, and a bare JSON list."""
    if isinstance(body, list):
        return [item for item in body if isinstance(item, dict)]
    if isinstance(body, dict):
        data = body.get("data")
        if isinstance(data, list):
            return [item for item in data if isinstance(item, dict)]
        for value in body.values():
            if isinstance(value, list):
                return [item for item in value if isinstance(item, dict)]
    return []


def _filename(response: httpx.Response) -> str | None:
    disposition = response.headers.get("Content-Disposition", "")
    for part in disposition.split(";"):
        key, _, value = part.strip().partition("=")
        if key.lower() == "filename" and value:
            return value.strip('"')
    return None
