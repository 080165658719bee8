"""Pairs and serving them: ``GET /pairs/next``.

Selection is a random probe into ``ix_pairs_pick (active, kind, rand_key)``: draw ``r`` in
[0, 1) and take the first active pair with ``rand_key >= r`` (wrapping around) that this
annotator has not been served, which the unique ``(user_id, pair_id)`` index answers. That is
uniform over the pool, needs no counter updates (no hot rows under load), and is three (or
four) short statements per request:

1. one aggregate over ``ix_pair_assignments_user_served`` for the daily / weekly cap (the API
   fetches it in the same statement as the user row, see ``backend.api.routes.pairs``);
2. one pick per kind group (a second only when the first group is exhausted): a ``UNION ALL``
   of, per kind and per side of ``r``, ``... WHERE kind = k AND rand_key >= r ORDER BY
   rand_key LIMIT 1``. Each branch is an ordered walk of ``ix_pairs_pick`` that stops at the
   first pair not yet served (one index probe of ``uq_pair_assignments_user_pair`` per pair
   walked, ``OFFSET 0`` keeps that probe a per-row subplan rather than a join over all of the
   user's assignments), so the cost does not grow with the pool or the user's history. (A
   single ``kind IN (...)`` filter cannot use the index order and sorted every pair above
   ``r``: O(pool) per request.) The wrap-around branch is in the same statement, so there is no
   second round trip when ``r`` lands above the last unserved pair;
3. ``INSERT ... ON CONFLICT DO NOTHING RETURNING`` of the assignment, which also settles two
   concurrent requests of the same annotator racing for the same pair (the loser retries).

The statements are built once per dialect (module level) with bound parameters, so a request
pays neither SQL construction nor cache-key generation.

With probability ``gold_fraction`` a gold (control) pair is tried first; either way the
other kind is the fallback, so an annotator is only out of work when both are exhausted.

A/B pairs (kind ``ab``) are in the regular group, drawn like the others, but served to one
annotator only: their branch skips a pair served to *anyone* (the ``ix_pair_assignments_pair_id``
index), so every A/B vote is a fresh (prompt, seeds, annotator) draw, as the sequential test
assumes (``docs/ab-test.md``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Float, and_, bindparam, exists, func, literal_column, select, union_all
from sqlalchemy.orm import Session

from backend.models import GoldAnswer, Image, Pair, PairAssignment, PairKind, Prompt
from backend.services.common import as_utc, dialect_insert, dialect_name
from backend.services.errors import Invalid, LimitReached, NotFound

REGULAR_KINDS = (PairKind.within_version, PairKind.cross_version, PairKind.ab)
#: Kinds served to one annotator only.
EXCLUSIVE_KINDS = frozenset({PairKind.ab})
GOLD_KINDS = (PairKind.gold,)
_PICK_ATTEMPTS = 4


@dataclass(frozen=True)
class ServedPair:
    pair_id: int
    kind: PairKind
    prompt: str
    left_image_id: int
    right_image_id: int


def create_pair(
    session: Session,
    *,
    kind: PairKind,
    image_a_id: int,
    image_b_id: int,
    gold_answer: GoldAnswer | None = None,
    source: str = "pool",
    rng: random.Random | None = None,
    ab_test_id: int | None = None,
) -> Pair:
    """Add a pair of two images of the same prompt. Gold pairs need their answer; A/B pairs
    their test (and images of two versions)."""
    if image_a_id == image_b_id:
        raise Invalid("a pair needs two different images")
    images = {
        i.id: i
        for i in session.scalars(select(Image).where(Image.id.in_([image_a_id, image_b_id])))
    }
    if len(images) != 2:
        raise NotFound("image not found")
    a, b = images[image_a_id], images[image_b_id]
    if a.prompt_id != b.prompt_id:
        raise Invalid("both images of a pair must come from the same prompt")
    if (kind == PairKind.gold) != (gold_answer is not None):
        raise Invalid("gold pairs, and only gold pairs, have a gold_answer")
    if kind == PairKind.within_version and a.version_id != b.version_id:
        raise Invalid("a within_version pair needs two images of one version")
    if kind in (PairKind.cross_version, PairKind.ab) and a.version_id == b.version_id:
        raise Invalid(f"a {kind.value} pair needs images of two versions")
    if (kind == PairKind.ab) != (ab_test_id is not None):
        raise Invalid("A/B pairs, and only A/B pairs, belong to an A/B test")
    pair = Pair(
        kind=kind,
        prompt_id=a.prompt_id,
        image_a_id=a.id,
        image_b_id=b.id,
        gold_answer=gold_answer,
        source=source,
        ab_test_id=ab_test_id,
        active=True,
        rand_key=(rng or random).random(),
    )
    session.add(pair)
    session.flush()
    return pair


def _day_start(now: datetime) -> datetime:
    return now.replace(hour=0, minute=0, second=0, microsecond=0)


_assign = PairAssignment.__table__
_pairs = Pair.__table__
_prompts = Prompt.__table__

_CAPS = select(
    func.count().filter(_assign.c.served_at >= bindparam("day")),
    func.count(),
    func.min(_assign.c.served_at),
).where(_assign.c.user_id == bindparam("user_id"), _assign.c.served_at >= bindparam("week"))


@dataclass(frozen=True, slots=True)
class CapCounts:
    """Pairs served to a user today (UTC) and in the last 7 days, and the oldest of those."""

    today: int
    this_week: int
    oldest: datetime | None

    @classmethod
    def from_row(cls, today: Any, this_week: Any, oldest: Any) -> CapCounts:
        return cls(int(today or 0), int(this_week or 0), as_utc(oldest))


def cap_window(now: datetime) -> dict[str, datetime]:
    """The bound parameters ``day`` and ``week`` of :data:`_CAPS` (and of any statement that
    embeds it, like the hot path's user check) for ``now``."""
    return {"day": _day_start(now), "week": now - timedelta(days=7)}


def caps_subquery() -> Any:
    """:data:`_CAPS` for ``:user_id`` as a one-row subquery (columns ``today``, ``this_week``,
    ``oldest``), for callers that fetch it together with other columns in one statement."""
    return (
        select(
            func.count().filter(_assign.c.served_at >= bindparam("day")).label("today"),
            func.count().label("this_week"),
            func.min(_assign.c.served_at).label("oldest"),
        )
        .where(_assign.c.user_id == bindparam("user_id"), _assign.c.served_at >= bindparam("week"))
        .subquery("caps")
    )


def count_caps(session: Session | Any, user_id: int, now: datetime) -> CapCounts:
    """One indexed aggregate (an index range of this user's last 7 days, at most
    ``weekly_cap`` entries since nothing is served past the cap)."""
    row = session.execute(_CAPS, {"user_id": user_id, **cap_window(now)}).one()
    return CapCounts.from_row(*row)


def enforce_caps(counts: CapCounts, daily_cap: int, weekly_cap: int, now: datetime) -> None:
    """Raise :class:`LimitReached` (with ``Retry-After``) when ``counts`` reach the daily
    (UTC day) or weekly (rolling 7 days) cap."""
    if counts.today >= daily_cap:
        wait = int((_day_start(now) + timedelta(days=1) - now).total_seconds()) + 1
        raise LimitReached(
            f"daily cap of {daily_cap} pairs reached", headers={"Retry-After": str(wait)}
        )
    if counts.this_week >= weekly_cap:
        wait = int(((counts.oldest or now) + timedelta(days=7) - now).total_seconds()) + 1
        raise LimitReached(
            f"weekly cap of {weekly_cap} pairs reached",
            headers={"Retry-After": str(max(wait, 1))},
        )


def _pick_statement(kinds: tuple[PairKind, ...]) -> Any:
    """The first unserved active pair of ``kinds`` at or after ``:r`` in ``rand_key`` order,
    else (wrapping around) the first one before it; with its prompt text. Constants are
    inlined (not bound) so that PostgreSQL's generic plan for the prepared statement is the
    same ordered index walk as a custom one."""
    one: Any = literal_column("1")
    zero: Any = literal_column("0")
    served = (
        select(one)
        .select_from(_assign)
        .where(and_(_assign.c.user_id == bindparam("user_id"), _assign.c.pair_id == _pairs.c.id))
        .limit(one)
        .offset(zero)  # keeps NOT EXISTS a per-row index probe (see the module doc)
    )
    served_to_anyone = (
        select(one)
        .select_from(_assign)
        .where(_assign.c.pair_id == _pairs.c.id)
        .limit(one)
        .offset(zero)
    )
    branches = []
    for wrap in (0, 1):
        r = bindparam("r", type_=Float())
        side = _pairs.c.rand_key >= r if wrap == 0 else _pairs.c.rand_key < r
        for kind in kinds:
            branches.append(
                select(
                    literal_column(str(wrap)).label("wrap"),
                    _pairs.c.id,
                    _pairs.c.kind,
                    _pairs.c.image_a_id,
                    _pairs.c.image_b_id,
                    _pairs.c.prompt_id,
                    _pairs.c.rand_key,
                )
                .where(
                    _pairs.c.active.is_(True),
                    _pairs.c.kind == literal_column(f"'{kind.value}'"),
                    side,
                    ~exists(served_to_anyone if kind in EXCLUSIVE_KINDS else served),
                )
                .order_by(_pairs.c.rand_key)
                .limit(one)
                .subquery()
                .select()
            )
    found = union_all(*branches).subquery("found")
    return (
        select(found.c.id, found.c.kind, found.c.image_a_id, found.c.image_b_id, _prompts.c.text)
        .join_from(found, _prompts, _prompts.c.id == found.c.prompt_id)
        .order_by(found.c.wrap, found.c.rand_key)
        .limit(one)
    )


_PICK = {REGULAR_KINDS: _pick_statement(REGULAR_KINDS), GOLD_KINDS: _pick_statement(GOLD_KINDS)}
_INSERT_ASSIGNMENT: dict[str, Any] = {}


def _insert_assignment(session: Session | Any) -> Any:
    name = dialect_name(session)
    stmt = _INSERT_ASSIGNMENT.get(name)
    if stmt is None:
        stmt = _INSERT_ASSIGNMENT[name] = (
            dialect_insert(session, _assign).on_conflict_do_nothing().returning(_assign.c.id)
        )
    return stmt


def _pick(session: Session | Any, user_id: int, kinds: tuple[PairKind, ...], r: float):  # type: ignore[no-untyped-def]
    return session.execute(_PICK[kinds], {"user_id": user_id, "r": r}).first()


def serve_next_pair(
    session: Session | Any,
    *,
    user_id: int,
    daily_cap: int,
    weekly_cap: int,
    gold_fraction: float,
    rng: random.Random | None = None,
    now: datetime | None = None,
    counts: CapCounts | None = None,
) -> ServedPair | None:
    """Pick a pair this user was never served, record the assignment (flushed), or None.

    ``session`` is an ORM session or a Core connection (the API's hot path uses the latter).
    ``counts``: the user's :class:`CapCounts` at ``now`` when the caller already fetched them
    (the API fetches them with the user row, one statement); else they are counted here."""
    rng = rng or random.Random()
    now = now or datetime.now(UTC)
    if counts is None:
        counts = count_caps(session, user_id, now)
    enforce_caps(counts, daily_cap, weekly_cap, now)
    order = (
        (GOLD_KINDS, REGULAR_KINDS) if rng.random() < gold_fraction else (REGULAR_KINDS, GOLD_KINDS)
    )
    for _ in range(_PICK_ATTEMPTS):
        row = None
        for kinds in order:
            row = _pick(session, user_id, kinds, rng.random())
            if row is not None:
                break
        if row is None:
            return None
        pair_id, kind, image_a, image_b, prompt = row
        left, right = (image_a, image_b) if rng.random() < 0.5 else (image_b, image_a)
        params = {
            "user_id": user_id,
            "pair_id": pair_id,
            "left_image_id": left,
            "right_image_id": right,
            "served_at": now,
        }
        if session.execute(_insert_assignment(session), params).first() is not None:
            return ServedPair(pair_id, PairKind(kind), prompt, left, right)
        # A concurrent request of this user took that pair first: pick again.
    return None
