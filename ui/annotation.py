"""The annotator's session and what each action does to it, independent of Gradio widgets.

An :class:`AnnotatorSession` lives in a ``gr.State`` (one per browser tab). The
:class:`AnnotationDesk` turns user actions (sign in, vote, a retry tick) into API calls and
returns a :class:`TaskView` that ``ui.app`` renders.

No waiting: while the annotator looks at the current pair, :meth:`AnnotationDesk.prefetch`
fetches the next pair and its image bytes, so a vote is answered with a pair whose images are
already on the UI server (and, through hidden preload images, in the browser's cache).
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from prefloop_client.api import (
    ApiError,
    ApiUnavailable,
    Choice,
    Conflict,
    Forbidden,
    NoPairReady,
    NotFound,
    Pair,
    PrefloopClient,
    RateLimited,
    Unauthorized,
)
from ui.image_store import ImageStore, NotAnImage

log = logging.getLogger(__name__)

#: Retry delay after an error that is not the API's "no pair ready" (network, broken image).
ERROR_RETRY_S = 5.0
#: Longest wait before asking again after a 429 (a daily cap may say "come back in 9 hours").
MAX_LIMIT_RETRY_S = 600.0
#: Longest the vote handler waits for an in-flight prefetch before fetching on its own.
PREFETCH_WAIT_S = 10.0
#: A client-measured latency above this is not trusted (tab left open overnight, clock jumps).
MAX_CLIENT_LATENCY_MS = 24 * 3600 * 1000


@dataclass
class PreparedPair:
    """A pair whose images are on local disk, with the id its vote will carry.

    ``client_vote_id`` is generated once per pair shown, so a retried submission of the same
    vote (a network error, a double press) is recognised by the API and counted once.
    """

    pair: Pair
    left_path: str
    right_path: str
    client_vote_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    shown_at: float | None = None


@dataclass
class AnnotatorSession:
    """One signed-in browser tab."""

    token: str
    username: str
    is_admin: bool
    current: PreparedPair | None = None
    upcoming: PreparedPair | None = None
    retry_at: float | None = None
    votes_this_session: int = 0
    skips_this_session: int = 0
    votes_today: int | None = None
    signed_out: bool = False
    done_pair_ids: set[str] = field(default_factory=set)
    prefetching: bool = False
    # Serialises user actions (vote, retry tick, sign-in's first pair) within the tab.
    action_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # Guards ``upcoming`` / ``prefetching``; waited on while a prefetch is in flight.
    cond: threading.Condition = field(default_factory=threading.Condition, repr=False)


ViewKind = Literal["pair", "waiting", "signed_out"]
NoticeLevel = Literal["info", "warning", "error"]


@dataclass(frozen=True)
class TaskView:
    """What the annotation tab should show after an action."""

    kind: ViewKind
    prompt: str = ""
    left_path: str | None = None
    right_path: str | None = None
    token: str = ""
    notice: str = ""
    level: NoticeLevel = "info"
    retry_in_s: int = 0
    votes_this_session: int = 0
    skips_this_session: int = 0
    votes_today: int | None = None
    username: str = ""


class AnnotationDesk:
    """Stateless service over the API; all per-user state is in the session passed in."""

    def __init__(
        self,
        client: PrefloopClient,
        images: ImageStore,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.images = images
        self.clock = clock

    # -- sign-in -------------------------------------------------------------------------------

    def sign_in(self, username: str, password: str) -> AnnotatorSession:
        """Exchange credentials for a token and find out whether the user is an admin.

        Raises :class:`Unauthorized` for wrong credentials, :class:`ApiUnavailable` when the
        API cannot be reached, :class:`ValueError` for empty fields.
        """
        username = username.strip()
        if not username or not password:
            raise ValueError("Enter a username and a password.")
        token = self.client.login(username, password)
        session = AnnotatorSession(token=token, username=username, is_admin=self._is_admin(token))
        try:
            session.votes_today = int(self.client.my_stats(token)["votes_today"])
        except (ApiError, ApiUnavailable, KeyError, TypeError, ValueError) as exc:
            log.info("no vote count for %s: %s", username, exc)
        return session

    def register(self, username: str, password: str) -> AnnotatorSession:
        """Open sign-up, then sign in with the new account."""
        username = username.strip()
        if not username or not password:
            raise ValueError("Enter a username and a password.")
        self.client.register(username, password)
        return self.sign_in(username, password)

    def _is_admin(self, token: str) -> bool:
        """Ask the API who we are; fall back to probing an admin-only endpoint."""
        try:
            me = self.client.me(token)
        except NotFound:
            me = None
        if me is not None:
            if "is_admin" in me:
                return bool(me["is_admin"])
            if "role" in me:
                return str(me["role"]) == "admin"
        try:
            self.client.stats(token)
        except Forbidden:
            return False
        return True

    # -- showing pairs -------------------------------------------------------------------------

    def _prepare(self, token: str, pair: Pair) -> PreparedPair:
        left = self.images.get(
            pair.left.image_id, lambda: self.client.image_bytes(token, pair.left)
        )
        right = self.images.get(
            pair.right.image_id, lambda: self.client.image_bytes(token, pair.right)
        )
        return PreparedPair(pair=pair, left_path=left, right_path=right)

    def _fetch(self, session: AnnotatorSession) -> PreparedPair | NoPairReady:
        result = self.client.next_pair(session.token)
        if isinstance(result, NoPairReady):
            return result
        if str(result.pair_id) in session.done_pair_ids:
            # The API promises never to serve a pair twice; do not show a judged pair again.
            log.warning("API served pair %s again to %s", result.pair_id, session.username)
            return NoPairReady(ERROR_RETRY_S)
        return self._prepare(session.token, result)

    def prefetch(self, session: AnnotatorSession) -> PreparedPair | None:
        """Fetch the next pair and its images in the background; returns it once ready.

        Errors are logged and swallowed: the next vote fetches on its own and reports them.
        """
        with session.cond:
            if (
                session.signed_out
                or session.current is None
                or session.upcoming is not None
                or session.prefetching
            ):
                return None
            session.prefetching = True
        prepared: PreparedPair | None = None
        try:
            result = self._fetch(session)
            if isinstance(result, PreparedPair):
                prepared = result
        except (ApiError, ApiUnavailable, NotAnImage, OSError) as exc:
            log.info("prefetch for %s failed: %s", session.username, exc)
        finally:
            with session.cond:
                session.prefetching = False
                current = session.current
                if prepared is not None and (
                    current is not None and prepared.pair.pair_id == current.pair.pair_id
                ):
                    prepared = None
                if prepared is not None:
                    session.upcoming = prepared
                session.cond.notify_all()
        return prepared

    def _take_upcoming(self, session: AnnotatorSession) -> PreparedPair | None:
        with session.cond:
            session.cond.wait_for(lambda: not session.prefetching, timeout=PREFETCH_WAIT_S)
            prepared, session.upcoming = session.upcoming, None
        return prepared

    def advance(
        self, session: AnnotatorSession, notice: str = "", level: NoticeLevel = "info"
    ) -> TaskView:
        """Show the next pair: the prefetched one if there is one, else fetch it now."""
        prepared = self._take_upcoming(session)
        if prepared is None:
            try:
                result = self._fetch(session)
            except Unauthorized:
                return self._expire(session)
            except RateLimited as exc:
                return self._limited(session, exc)
            except ApiError as exc:
                return self._wait(session, ERROR_RETRY_S, _api_error_text(exc), "error")
            except (ApiUnavailable, NotAnImage, OSError) as exc:
                return self._wait(session, ERROR_RETRY_S, str(exc), "error")
            if isinstance(result, NoPairReady):
                return self._wait(session, result.retry_after_s, notice, level)
            prepared = result
        prepared.shown_at = self.clock()
        session.current = prepared
        session.retry_at = None
        return self.view(session, notice, level)

    def _wait(
        self, session: AnnotatorSession, seconds: float, notice: str, level: NoticeLevel
    ) -> TaskView:
        session.current = None
        session.retry_at = self.clock() + max(1.0, seconds)
        return self.view(session, notice, level)

    def _limited(self, session: AnnotatorSession, exc: RateLimited) -> TaskView:
        wait = min(exc.retry_after_s or ERROR_RETRY_S, MAX_LIMIT_RETRY_S)
        return self._wait(session, wait, f"Limit reached: {exc.detail}.", "warning")

    def _expire(self, session: AnnotatorSession) -> TaskView:
        session.signed_out = True
        session.current = None
        session.retry_at = None
        return self.view(session, "Your session has expired. Please sign in again.", "warning")

    def view(
        self, session: AnnotatorSession, notice: str = "", level: NoticeLevel = "info"
    ) -> TaskView:
        common: dict[str, Any] = {
            "votes_this_session": session.votes_this_session,
            "skips_this_session": session.skips_this_session,
            "votes_today": session.votes_today,
            "username": session.username,
            "notice": notice,
            "level": level,
        }
        if session.signed_out:
            return TaskView(kind="signed_out", **common)
        current = session.current
        if current is None:
            retry_in = 0
            if session.retry_at is not None:
                retry_in = max(0, math.ceil(session.retry_at - self.clock()))
            return TaskView(kind="waiting", retry_in_s=retry_in, **common)
        return TaskView(
            kind="pair",
            prompt=current.pair.prompt,
            left_path=current.left_path,
            right_path=current.right_path,
            token=current.client_vote_id,
            **common,
        )

    def start(self, session: AnnotatorSession) -> TaskView:
        """First pair after sign-in."""
        with session.action_lock:
            return self.advance(session)

    def tick(self, session: AnnotatorSession) -> TaskView | None:
        """Called every second while waiting; retries when the Retry-After delay is over.

        Returns None when nothing changed that the page needs to know (busy, or not waiting).
        """
        if not session.action_lock.acquire(blocking=False):
            return None
        try:
            if session.signed_out or session.current is not None or session.retry_at is None:
                return None
            if self.clock() < session.retry_at:
                return self.view(session)
            return self.advance(session)
        finally:
            session.action_lock.release()

    # -- voting --------------------------------------------------------------------------------

    def vote(
        self,
        session: AnnotatorSession,
        choice: Choice,
        shown_token: str,
        client_latency_ms: float | None = None,
    ) -> TaskView | None:
        """Submit ``choice`` for the pair the browser showed (identified by ``shown_token``).

        Returns None when the press is stale (the browser's pair is no longer current, or a
        vote for it is in flight); the page then stays as it is.
        """
        if not session.action_lock.acquire(blocking=False):
            return None
        try:
            current = session.current
            if session.signed_out or current is None or current.client_vote_id != shown_token:
                return None
            latency_ms = _latency_ms(client_latency_ms, current.shown_at, self.clock())
            try:
                receipt = self.client.vote(
                    session.token,
                    pair_id=current.pair.pair_id,
                    choice=choice,
                    client_vote_id=current.client_vote_id,
                    latency_ms=latency_ms,
                )
            except Unauthorized:
                return self._expire(session)
            except Conflict as exc:
                session.done_pair_ids.add(str(current.pair.pair_id))
                return self.advance(
                    session,
                    f"You had already voted differently on that pair; the first vote stands. "
                    f"({exc.detail})",
                    "warning",
                )
            except NotFound as exc:
                return self.advance(
                    session, f"That pair is no longer available ({exc.detail}).", "warning"
                )
            except RateLimited as exc:
                return self.view(
                    session, f"The vote was not saved: {exc.detail}. Try again shortly.", "warning"
                )
            except ApiError as exc:
                # Keep the pair on screen: the same press again is safe (same client_vote_id).
                return self.view(
                    session, f"The vote was not saved: {_api_error_text(exc)}", "error"
                )
            except ApiUnavailable as exc:
                return self.view(
                    session, f"The vote was not saved, press again to retry. {exc}", "error"
                )
            session.done_pair_ids.add(str(current.pair.pair_id))
            session.votes_this_session += 1
            if choice == "skip":
                session.skips_this_session += 1
            if session.votes_today is not None and not receipt.duplicate:
                session.votes_today += 1
            return self.advance(session)
        finally:
            session.action_lock.release()


def _latency_ms(client_ms: float | None, shown_at: float | None, now: float) -> int | None:
    """Prefer the browser's display-to-click time; fall back to the server's view of it."""
    if (
        client_ms is not None
        and math.isfinite(client_ms)
        and 0 <= client_ms <= MAX_CLIENT_LATENCY_MS
    ):
        return int(round(client_ms))
    if shown_at is None:
        return None
    return int(round(max(0.0, now - shown_at) * 1000))


def _api_error_text(exc: ApiError) -> str:
    return f"{exc.detail} (HTTP {exc.status_code})"
