"""Storing votes: idempotent, concurrency-safe, one insert per new vote.

``submit_vote`` reads everything it needs in one statement (the pair, this annotator's
assignment of it, their existing vote on it, and any vote of theirs with the same
``client_vote_id``), decides, then inserts with ``ON CONFLICT DO NOTHING RETURNING id``.
The unique constraints ``(user_id, pair_id)`` and ``(user_id, client_vote_id)`` are the
arbiters under concurrency: when the insert returns nothing, another request of this user
committed first, and the lookup is repeated to answer exactly as if it had come second.

Rules:

- unknown pair: :class:`NotFound` (404);
- a pair that exists but was never served to this annotator: :class:`Conflict` (409), since
  the side order is unknown and the vote could not be resolved to an image;
- same annotator + pair with the same choice (whatever the ``client_vote_id``): the existing
  vote, ``created=False``;
- same annotator + pair with another choice: 409;
- a ``client_vote_id`` this annotator already used on another pair: 409.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import String, and_, bindparam, select
from sqlalchemy.orm import Session

from backend.models import Choice, Pair, PairAssignment, Vote
from backend.services.common import dialect_insert, dialect_name
from backend.services.errors import Conflict, NotFound


@dataclass(frozen=True)
class VoteOutcome:
    vote_id: int
    pair_id: int
    choice: Choice
    created: bool
    #: The A/B test of the pair (kind ``ab``), whose decision the caller then checks.
    ab_test_id: int | None = None


_votes = Vote.__table__
_pairs = Pair.__table__
_assign = PairAssignment.__table__
_same = _votes.alias("same_pair")
_by_client = _votes.alias("same_client_id")

#: Built once: a request pays neither SQL construction nor cache-key generation. A NULL
#: ``:client_vote_id`` matches nothing (``= NULL`` is never true), as intended.
_LOOKUP = (
    select(
        _pairs.c.id,
        _assign.c.left_image_id,
        _assign.c.right_image_id,
        _same.c.id,
        _same.c.choice,
        _by_client.c.id,
        _by_client.c.pair_id,
        _pairs.c.ab_test_id,
    )
    .select_from(_pairs)
    .outerjoin(
        _assign,
        and_(_assign.c.pair_id == _pairs.c.id, _assign.c.user_id == bindparam("user_id")),
    )
    .outerjoin(_same, and_(_same.c.pair_id == _pairs.c.id, _same.c.user_id == bindparam("user_id")))
    .outerjoin(
        _by_client,
        and_(
            _by_client.c.user_id == bindparam("user_id"),
            _by_client.c.client_vote_id == bindparam("client_vote_id", type_=String(64)),
        ),
    )
    .where(_pairs.c.id == bindparam("pair_id"))
)
_INSERT: dict[str, Any] = {}


def _insert_vote(session: Session | Any) -> Any:
    name = dialect_name(session)
    stmt = _INSERT.get(name)
    if stmt is None:
        stmt = _INSERT[name] = (
            dialect_insert(session, _votes).on_conflict_do_nothing().returning(_votes.c.id)
        )
    return stmt


def _lookup(session: Session | Any, user_id: int, pair_id: int, client_vote_id: str | None):  # type: ignore[no-untyped-def]
    params = {"user_id": user_id, "pair_id": pair_id, "client_vote_id": client_vote_id}
    return session.execute(_LOOKUP, params).first()


def _decide(row, pair_id: int, choice: Choice) -> VoteOutcome | None:  # type: ignore[no-untyped-def]
    if row is None:
        raise NotFound(f"pair {pair_id} not found")
    _, left, _right, vote_id, vote_choice, client_vote, client_pair, _ab_test = row
    if vote_id is not None:
        if Choice(vote_choice) == choice:
            return VoteOutcome(vote_id, pair_id, choice, created=False)
        raise Conflict(
            f"you already voted {Choice(vote_choice).value!r} on pair {pair_id}; "
            "a vote cannot be changed"
        )
    if client_vote is not None and client_pair != pair_id:
        raise Conflict("client_vote_id was already used for a vote on another pair")
    if left is None:
        raise Conflict(f"pair {pair_id} was not served to you; get pairs from /pairs/next")
    return None


def submit_vote(
    session: Session | Any,
    *,
    user_id: int,
    pair_id: int,
    choice: Choice,
    client_vote_id: str | None = None,
    latency_ms: int | None = None,
    now: datetime | None = None,
) -> VoteOutcome:
    row = _lookup(session, user_id, pair_id, client_vote_id)
    decided = _decide(row, pair_id, choice)
    if decided is not None:
        return decided
    assert row is not None
    left, right = row[1], row[2]
    winner = left if choice == Choice.left else right if choice == Choice.right else None
    params = {
        "user_id": user_id,
        "pair_id": pair_id,
        "choice": choice.value,
        "winner_image_id": winner,
        "client_vote_id": client_vote_id,
        "latency_ms": latency_ms,
        "created_at": now or datetime.now(UTC),
    }
    inserted = session.execute(_insert_vote(session), params).first()
    if inserted is not None:
        return VoteOutcome(int(inserted[0]), pair_id, choice, created=True, ab_test_id=row[7])
    # Lost a race against another request of the same user: answer as the second request.
    decided = _decide(_lookup(session, user_id, pair_id, client_vote_id), pair_id, choice)
    if decided is None:  # pragma: no cover - the conflicting row must be visible now
        raise Conflict("concurrent vote conflict; retry")
    return decided
