"""Training rounds: creation with a dataset snapshot, listing, cancelling, scheduling.

A round snapshots its dataset as ``(snapshot_max_vote_id, snapshot_vote_count)``: the worker
trains on the votes with ``id <= snapshot_max_vote_id``, so votes arriving during training
never change what a round sees, and a retried round sees the same data.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Select, and_, func, or_, select, update
from sqlalchemy.orm import Session

from backend import aggregation
from backend.dispatch import Dispatcher
from backend.models import (
    Choice,
    Pair,
    PairKind,
    RoundMetric,
    RoundStatus,
    TrainingRound,
    User,
    UserStatus,
    Vote,
)
from backend.round_config import RoundConfig
from backend.services import versions
from backend.services.errors import Conflict, NotFound

log = logging.getLogger(__name__)

#: ``Pair.source`` of the pairs a dataset import made (``backend.services.datasets``).
IMPORT_SOURCE = "import"


def training_votes(
    *columns: Any,
    include_ties: bool,
    max_vote_id: int | None = None,
    data_source: str = "both",
) -> Select[Any]:
    """``SELECT columns`` over *the votes a round trains on*: the one definition, used for the
    count admins see (``snapshot_vote_count``), the schedule, and the worker's snapshot.

    Votes on within-version pairs, and on imported cross-model pairs (Pick-a-Pic's: fixed
    images of two outside models, Diffusion-DPO's own setting), never on A/B, gold or
    collected cross-version pairs; by active annotators (never banned or shadow-banned ones);
    left or right, plus ties when ``include_ties``; both-bad and skip never; with
    ``id <= max_vote_id`` when given. ``data_source``: ``collected`` (pairs the pool made),
    ``imported`` (dataset imports) or ``both``. ``votes`` is joined to ``pairs`` and
    ``users``; callers join more (prompts, images) and order as they need.
    """
    choices = [Choice.left, Choice.right] + ([Choice.tie] if include_ties else [])
    imported = Pair.source == IMPORT_SOURCE
    pairs = {
        "collected": and_(Pair.kind == PairKind.within_version, Pair.source != IMPORT_SOURCE),
        "imported": and_(
            imported, Pair.kind.in_([PairKind.within_version, PairKind.cross_version])
        ),
        "both": or_(
            Pair.kind == PairKind.within_version,
            and_(imported, Pair.kind == PairKind.cross_version),
        ),
    }
    if data_source not in pairs:
        raise ValueError(f"data_source must be one of {sorted(pairs)}, not {data_source!r}")
    q = (
        select(*columns)
        .select_from(Vote)
        .join(Pair, Pair.id == Vote.pair_id)
        .join(User, User.id == Vote.user_id)
        .where(
            pairs[data_source],
            Vote.choice.in_(choices),
            User.status == UserStatus.active,
        )
    )
    if max_vote_id is not None:
        q = q.where(Vote.id <= max_vote_id)
    return q


def label_snapshot(
    rows: Iterable[Sequence[Any]],
    label_rule: str,
    *,
    exclude_users: Collection[int] = frozenset(),
) -> tuple[list[tuple[Any, ...]], dict[str, Any]]:
    """A round's training votes made into training labels by ``label_rule``
    (:mod:`backend.aggregation`).

    ``rows``: ``(pair_id, user_id, choice, winner_image_id, *rest)`` in vote order, where
    ``rest`` starts with ``(prompt, image_a_id, image_a_path, image_b_id, image_b_path)`` (the
    worker's snapshot). Votes of ``exclude_users`` (flagged annotators) are dropped first.
    Returns ``(labels, summary)``: one ``(choice, winner_image_id, *rest)`` per label (``each``:
    the votes themselves; the other rules: one per kept pair, ``left`` with the winner image or
    ``tie``, in the order of each pair's first vote), and the counts for the round's metrics
    (:meth:`backend.aggregation.Aggregation.summary` plus ``excluded_votes`` and
    ``excluded_annotators``)."""
    votes: list[aggregation.PairVote] = []
    first: dict[int, tuple[Any, ...]] = {}
    kept_rows: list[tuple[Any, ...]] = []
    excluded_votes = 0
    excluded_users: set[int] = set()
    for pair_id, user_id, choice, winner, *rest in rows:
        if user_id in exclude_users:
            excluded_votes += 1
            excluded_users.add(user_id)
            continue
        a_id, b_id = rest[1], rest[3]
        if Choice(choice) == Choice.tie:
            label = "tie"
        elif winner in (a_id, b_id):
            label = "a" if winner == a_id else "b"
        else:
            log.warning("vote with winner %s outside its pair (%s, %s) skipped", winner, a_id, b_id)
            continue
        votes.append(aggregation.PairVote(pair_id, user_id, label))
        kept_rows.append((choice, winner, *rest))
        first.setdefault(pair_id, tuple(rest))
    result = aggregation.aggregate(votes, label_rule)
    if label_rule == "each":
        labels = kept_rows
    else:
        labels = []
        for lab in result.labels:
            pair_rest = first[lab.pair_id]
            if lab.label == "tie":
                labels.append((Choice.tie.value, None, *pair_rest))
            else:
                winner = pair_rest[1] if lab.label == "a" else pair_rest[3]
                labels.append((Choice.left.value, winner, *pair_rest))
    summary = result.summary()
    summary["excluded_votes"] = excluded_votes
    summary["excluded_annotators"] = len(excluded_users)
    return labels, summary


def _training_votes(config: RoundConfig | None = None) -> Select[Any]:
    """``(count, max id)`` of the training votes (ties and data source as ``config`` says;
    default: with ties, both sources)."""
    include_ties = config is None or config.include_ties
    source = config.data_source if config is not None else "both"
    return training_votes(
        func.count(), func.max(Vote.id), include_ties=include_ties, data_source=source
    )


def commit_and_dispatch(
    session: Session, dispatcher: Dispatcher, round_id: int, *, now: datetime | None = None
) -> str | None:
    """Commit the session (the round must exist before a worker can see its id), hand the
    round to the workers, and record the task id on it (committed; only while the round is
    still ``queued``, so a worker that already claimed it keeps its own). A failed dispatch
    is logged and leaves the round ``queued``: the sweeper sends it again. Returns the task
    id, or None. ``now``: the round's ``updated_at`` with the task id (the sweeper's clock),
    instead of the column's own default."""
    session.commit()
    try:
        task_id = dispatcher.dispatch_round(round_id)
    except Exception:  # noqa: BLE001 - the round stays queued; the sweeper re-sends it
        log.exception("dispatching round %s failed; it stays queued for the sweeper", round_id)
        return None
    if task_id:
        session.execute(
            update(TrainingRound)
            .where(TrainingRound.id == round_id, TrainingRound.status == RoundStatus.queued)
            .values(celery_task_id=task_id, **({"updated_at": now} if now else {}))
            .execution_options(synchronize_session=False)
        )
        session.commit()
    return task_id


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
