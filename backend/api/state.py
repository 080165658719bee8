"""Everything a request needs, built once per app by :func:`backend.main.create_app`."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import weakref
from dataclasses import dataclass, field

from backend.db import Database
from backend.dispatch import Dispatcher
from backend.observability import Metrics
from backend.rate_limit import Limiter
from backend.security import PasswordService, TokenService
from backend.settings import Settings
from backend.storage import ImageStore, ObjectStore


class ImageSigner:
    """Signed image URLs: ``/api/v1/images/{id}?sig=...``. The signature is an HMAC of the id,
    so the URL is stable (cacheable) and works in an ``<img>`` tag without a token, while ids
    cannot be enumerated."""

    def __init__(self, secret: str) -> None:
        self._key = hashlib.sha256(b"prefloop-image-url:" + secret.encode()).digest()

    def sign(self, image_id: int) -> str:
        return hmac.new(self._key, str(image_id).encode(), hashlib.sha256).hexdigest()[:32]

    def verify(self, image_id: int, sig: str) -> bool:
        return hmac.compare_digest(self.sign(image_id).encode(), sig.encode("utf-8", "replace"))

    def url(self, image_id: int) -> str:
        return f"/api/v1/images/{image_id}?sig={self.sign(image_id)}"


@dataclass
class AppState:
    settings: Settings
    db: Database
    passwords: PasswordService
    tokens: TokenService
    dispatcher: Dispatcher
    metrics: Metrics
    login_limiter: Limiter
    register_limiter: Limiter
    store: ImageStore
    signer: ImageSigner
    #: Version artifacts (adapters, validation grids): ``backend.storage.artifact_store``.
    artifacts: ObjectStore
    _gates: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = field(
        default_factory=weakref.WeakKeyDictionary
    )
    #: A/B tests being checked after a vote, and those with a vote since their check began
    #: (``backend.api.ab_checks``): at most one check per test at a time in this process.
    ab_checking: set[int] = field(default_factory=set)
    ab_recheck: set[int] = field(default_factory=set)

    def sqlite_write_gate(self) -> asyncio.Lock:
        """One write request at a time per event loop, on SQLite only.

        SQLite has one writer anyway. Without this gate, a request holding the write lock
        (taken at its first statement, in the auth dependency) can wait for a thread-pool
        slot that is occupied by other requests all blocked on that same lock: a stall of
        ``busy_timeout``. Waiting here costs no thread."""
        loop = asyncio.get_running_loop()
        gate = self._gates.get(loop)
        if gate is None:
            gate = self._gates[loop] = asyncio.Lock()
        return gate
