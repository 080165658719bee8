"""Training rounds: creation with a dataset snapshot, listing, cancelling, scheduling.

A round snapshots its dataset as ``(snapshot_max_vote_id, snapshot_vote_count)``: the worker
trains on the votes with ``id <= snapshot_max_vote_id``, so votes arriving during training
never change what a round sees, and a retried round sees the same data.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from backend.models import (
    Choice,
    Pair,
    PairKind,
    RoundMetric,
    RoundStatus,
    TrainingRound,
    Vote,
)
from backend.round_config import RoundConfig
from backend.services import versions
from backend.services.errors import Conflict, NotFound


def _training_votes(config: RoundConfig | None = None):  # type: ignore[no-untyped-def]
    choices = [Choice.left, Choice.right]
    if config is None or config.include_ties:
        choices.append(Choice.tie)
    return (
        select(func.count(), func.max(Vote.id))
        .join(Pair, Pair.id == Vote.pair_id)
        .where(Pair.kind == PairKind.within_version, Vote.choice.in_(choices))
    )


def base_model_for(session: Session, parent_version_id: int | None, fallback: str) -> str:
    """The base model a round on ``parent_version_id`` (default: the serving version) trains;
    ``fallback`` (the configured base model) when there is no version yet. 404 for an unknown
    ``parent_version_id``."""
    if parent_version_id is not None:
        return versions.get_version(session, parent_version_id).base_model
    parent = versions.serving_version(session)
    return parent.base_model if parent is not None else fallback


def create_round(
    session: Session,
    config: RoundConfig,
    *,
    created_by: int | None,
    parent_version_id: int | None = None,
) -> TrainingRound:
    """Queue a round on the serving version (or ``parent_version_id``)."""
    if parent_version_id is None:
        parent = versions.serving_version(session)
        parent_version_id = parent.id if parent else None
    else:
        versions.get_version(session, parent_version_id)
    count, max_id = session.execute(_training_votes(config)).one()
    rnd = TrainingRound(
        status=RoundStatus.queued,
        config=config.model_dump(mode="json"),
        parent_version_id=parent_version_id,
        snapshot_max_vote_id=int(max_id or 0),
        snapshot_vote_count=int(count or 0),
        total_steps=config.steps,
        created_by=created_by,
        metrics={},
    )
    session.add(rnd)
    session.flush()
    return rnd


def get_round(session: Session, round_id: int, *, for_update: bool = False) -> TrainingRound:
    q = select(TrainingRound).where(TrainingRound.id == round_id)
    if for_update:
        q = q.with_for_update()
    rnd = session.scalars(q).first()
    if rnd is None:
        raise NotFound(f"round {round_id} not found")
    return rnd


def list_rounds(
    session: Session, *, offset: int, limit: int, status: RoundStatus | None = None
) -> tuple[list[TrainingRound], int]:
    q = select(TrainingRound)
    c = select(func.count()).select_from(TrainingRound)
    if status is not None:
        q = q.where(TrainingRound.status == status)
        c = c.where(TrainingRound.status == status)
    rows = list(session.scalars(q.order_by(TrainingRound.id.desc()).offset(offset).limit(limit)))
    return rows, session.scalar(c) or 0


def cancel_round(session: Session, round_id: int) -> TrainingRound:
    """Mark a queued/running/evaluating round cancelled (the worker checks and stops);
    409 when it has already finished."""
    rnd = get_round(session, round_id, for_update=True)
    if RoundStatus(rnd.status).finished:
        raise Conflict(f"round {round_id} already {RoundStatus(rnd.status).value}")
    rnd.status = RoundStatus.cancelled
    rnd.finished_at = datetime.now(UTC)
    session.flush()
    return rnd


def round_metrics(
    session: Session, round_id: int, *, after_step: int = -1, limit: int = 1000
) -> list[RoundMetric]:
    get_round(session, round_id)
    return list(
        session.scalars(
            select(RoundMetric)
            .where(RoundMetric.round_id == round_id, RoundMetric.step > after_step)
            .order_by(RoundMetric.step)
            .limit(limit)
        )
    )


def round_due(session: Session, every_n_pairs: int) -> bool:
    """Whether the schedule wants a new round: at least ``every_n_pairs`` new training votes
    since the newest round's snapshot, and no round queued or running."""
    if every_n_pairs <= 0:
        return False
    active = session.scalar(
        select(func.count())
        .select_from(TrainingRound)
        .where(
            TrainingRound.status.in_(
                [RoundStatus.queued, RoundStatus.running, RoundStatus.evaluating]
            )
        )
    )
    if active:
        return False
    last_max = session.scalar(select(func.max(TrainingRound.snapshot_max_vote_id))) or 0
    count, _ = session.execute(_training_votes().where(Vote.id > last_max)).one()
    return int(count or 0) >= every_n_pairs
