"""The pool of ready pairs, as the worker that fills it and the metrics that watch it count it.

Torch-free: the API's ``/metrics`` reads it, and :mod:`worker.pair_pool` tops the pool up to
``pair_pool_target`` by it.
"""

from __future__ import annotations

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from backend.models import Pair, PairAssignment, PairKind, Vote


def count_ready(session: Session, overlap: int) -> int:
    """Active pairs with fewer than ``overlap`` votes (A/B pairs: never served)."""
    votes = select(Vote.pair_id, func.count().label("n")).group_by(Vote.pair_id).subquery()
    served = select(PairAssignment.pair_id).where(PairAssignment.pair_id == Pair.id)
    return int(
        session.scalar(
            select(func.count())
            .select_from(Pair)
            .outerjoin(votes, votes.c.pair_id == Pair.id)
            .where(
                Pair.active.is_(True),
                or_(
                    and_(
                        Pair.kind != PairKind.ab,
                        or_(votes.c.n.is_(None), votes.c.n < overlap),
                    ),
                    and_(Pair.kind == PairKind.ab, ~served.exists()),
                ),
            )
        )
        or 0
    )


__all__ = ["count_ready"]
