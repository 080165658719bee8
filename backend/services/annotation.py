"""The annotation hot path: ``GET /pairs/next`` and ``POST /votes``, one call each.

:func:`next_pair` and :func:`submit_vote` take a pooled connection and the bearer token's
verified claims, and do all of the endpoint's database work on it: the user check (401 when
the user no longer exists or the token predates its ``token_version``, 403 when banned), then
the endpoint's statements. The API calls each directly, in one thread-pool hop
(:func:`backend.api.deps.run_hot`: route -> this function -> :mod:`backend.services.pairs` /
:mod:`backend.services.votes`), and whatever it wrote is committed when it returns.

- :func:`next_pair`: one statement for the user check *and* the cap counts (429), then the
  pick and the assignment (:func:`backend.services.pairs.serve_next_pair`).
- :func:`submit_vote`: one primary-key lookup for the user check, then the vote's lookup and
  insert (:func:`backend.services.votes.submit_vote`).

A shadow-banned annotator passes the check: they are served and vote as anyone else; their
votes simply never train or count (docs/data-quality.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, bindparam, select, true
from sqlalchemy.orm import Session

from backend.models import Choice, User, UserStatus
from backend.security import TokenClaims
from backend.services import pairs as pair_service
from backend.services import votes as vote_service
from backend.services.errors import Forbidden, Unauthorized
from backend.settings import Settings


@dataclass(frozen=True, slots=True)
class ActiveUser:
    """What the hot paths need of the user row."""

    id: int
    daily_cap: int | None
    weekly_cap: int | None


_users = User.__table__
_USER_BY_ID = select(
    _users.c.status, _users.c.daily_cap, _users.c.weekly_cap, _users.c.token_version
).where(_users.c.id == bindparam("id"))
_caps = pair_service.caps_subquery()
#: The user check of :func:`check_user` and the cap counts in one statement.
_USER_AND_CAPS = (
    select(
        _users.c.status,
        _users.c.daily_cap,
        _users.c.weekly_cap,
        _caps.c.today,
        _caps.c.this_week,
        _caps.c.oldest,
        _users.c.token_version,
    )
    .select_from(_users)
    .join(_caps, true())
    .where(_users.c.id == bindparam("user_id"))
)


def valid_user_id(claims: TokenClaims) -> bool:
    return 0 < claims.user_id < 2**31


def active_user(row: Any, claims: TokenClaims) -> ActiveUser:
    """401 / 403 from a ``(status, daily_cap, weekly_cap, ...)`` row of the user with a
    ``token_version`` column (None when there is none), as the API's ``CurrentUser``
    answers."""
    if row is None:
        raise Unauthorized()
    if row[0] == UserStatus.banned:
        raise Forbidden("account is banned")
    if row.token_version != claims.version:
        raise Unauthorized()
    return ActiveUser(claims.user_id, row[1], row[2])


def check_user(conn: Connection | Session, claims: TokenClaims) -> ActiveUser:
    """The user check alone (one primary-key lookup)."""
    row = (
        conn.execute(_USER_BY_ID, {"id": claims.user_id}).first() if valid_user_id(claims) else None
    )
    return active_user(row, claims)


def next_pair(
    conn: Connection, claims: TokenClaims, settings: Settings
) -> pair_service.ServedPair | None:
    """A pair this annotator has never been served, sides in random order (None when no pair
    is ready). Three statements: user check with the cap counts, pick, assignment."""
    now = datetime.now(UTC)
    row = (
        conn.execute(
            _USER_AND_CAPS, {"user_id": claims.user_id, **pair_service.cap_window(now)}
        ).first()
        if valid_user_id(claims)
        else None
    )
    user = active_user(row, claims)  # 401 / 403 before the caps' 429
    assert row is not None  # active_user raised otherwise
    return pair_service.serve_next_pair(
        conn,
        user_id=user.id,
        daily_cap=user.daily_cap if user.daily_cap is not None else settings.daily_vote_cap,
        weekly_cap=user.weekly_cap if user.weekly_cap is not None else settings.weekly_vote_cap,
        gold_fraction=settings.gold_fraction,
        now=now,
        counts=pair_service.CapCounts.from_row(row[3], row[4], row[5]),
    )


def submit_vote(
    conn: Connection,
    claims: TokenClaims,
    pair_id: int,
    choice: Choice,
    client_vote_id: str | None,
    latency_ms: int | None,
) -> vote_service.VoteOutcome:
    """Store a vote (see :func:`backend.services.votes.submit_vote` for its rules)."""
    user = check_user(conn, claims)
    return vote_service.submit_vote(
        conn,
        user_id=user.id,
        pair_id=pair_id,
        choice=choice,
        client_vote_id=client_vote_id,
        latency_ms=latency_ms,
    )
