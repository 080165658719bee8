"""The sweeper and the scheduler of training rounds (the ``rounds.sweep`` task, run by beat).

:func:`sweep` re-dispatches queued rounds that no worker picked up and re-queues (or, after
:data:`~worker.round_state.MAX_ATTEMPTS`, fails) rounds whose worker stopped beating (the
claim and heartbeat: :mod:`worker.round_state`). :func:`maybe_schedule_round` starts a round
every ``settings.round_every_n_pairs`` new training votes. Both commit a round before they
dispatch it (``backend.services.rounds.commit_and_dispatch``).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select

from backend.dispatch import Dispatcher
from backend.models import RoundStatus, TrainingRound
from backend.round_config import RoundConfig, resolve_config
from backend.services import rounds as round_service
from backend.settings import Settings
from worker.round_state import (
    ACTIVE,
    FINISHED,
    MAX_ATTEMPTS,
    STALE_AFTER_S,
    WORK_DIR_PREFIX,
    SessionFactory,
    _now,
    work_dir,
)

log = logging.getLogger(__name__)

#: A queued round not started after this long is dispatched again by the sweeper.
REDISPATCH_AFTER_S = 120.0


@dataclass
class SweepResult:
    redispatched: list[int] = field(default_factory=list)
    requeued: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)


def sweep(
    session_factory: SessionFactory,
    dispatcher: Dispatcher,
    *,
    redispatch_after_s: float = REDISPATCH_AFTER_S,
    stale_after_s: float = STALE_AFTER_S,
    now: datetime | None = None,
) -> SweepResult:
    """Re-send committed rounds that no worker runs.

    - ``queued`` rounds untouched for ``redispatch_after_s`` (their dispatch failed, or the
      message was lost) are dispatched again; a duplicate message is harmless, because the
      claim ignores a round another live worker owns.
    - ``running`` / ``evaluating`` rounds whose heartbeat is older than ``stale_after_s`` lost
      their worker: they go back to ``queued`` and are dispatched again (the next claim resumes
      from the trainer's checkpoint), or fail once they have had :data:`MAX_ATTEMPTS`.

    Every state change is committed before its message is sent.
    """
    now = now or _now()
    out = SweepResult()
    with session_factory() as session:
        stale = session.scalars(
            select(TrainingRound)
            .where(
                TrainingRound.status.in_(ACTIVE),
                TrainingRound.updated_at < now - timedelta(seconds=stale_after_s),
            )
            .with_for_update()
        ).all()
        for rnd in stale:
            if rnd.attempts >= MAX_ATTEMPTS:
                rnd.status = RoundStatus.failed
                rnd.error = f"the worker was lost {rnd.attempts} times; giving up"
                rnd.finished_at = now
                out.failed.append(rnd.id)
            else:
                rnd.status = RoundStatus.queued
                rnd.error = f"worker lost during attempt {rnd.attempts}; re-queued"
                out.requeued.append(rnd.id)
            rnd.updated_at = now
        waiting = session.scalars(
            select(TrainingRound)
            .where(
                TrainingRound.status == RoundStatus.queued,
                TrainingRound.updated_at < now - timedelta(seconds=redispatch_after_s),
            )
            .with_for_update()
        ).all()
        for rnd in waiting:
            rnd.updated_at = now
            out.redispatched.append(rnd.id)
        session.commit()
    for round_id in out.requeued + out.redispatched:
        with session_factory() as session:
            round_service.commit_and_dispatch(session, dispatcher, round_id, now=now)
    if out.redispatched or out.requeued or out.failed:
        log.info("sweep: %s", out)
    return out


def maybe_schedule_round(
    session_factory: SessionFactory, settings: Settings, dispatcher: Dispatcher
) -> int | None:
    """Queue a round on the serving version when ``settings.round_every_n_pairs`` new training
    votes arrived since the last round's snapshot and no round is active; dispatch it after
    the commit. Returns the new round's id.

    The config is the latest succeeded round's (what an admin last chose and saw work), else
    the defaults for the serving version's base model family.
    """
    if settings.round_every_n_pairs <= 0:
        return None
    with session_factory() as session:
        if not round_service.round_due(session, settings.round_every_n_pairs):
            return None
        last = session.scalars(
            select(TrainingRound.config)
            .where(TrainingRound.status == RoundStatus.succeeded)
            .order_by(TrainingRound.id.desc())
            .limit(1)
        ).first()
        base_model = round_service.base_model_for(session, None, settings.base_model)
        try:
            config = RoundConfig.model_validate(last) if last else resolve_config({}, base_model)
        except ValueError:
            config = resolve_config({}, base_model)
        rnd = round_service.create_round(session, config, created_by=None)
        round_id = rnd.id
        log.info("scheduled round %s (every %d new votes)", round_id, settings.round_every_n_pairs)
        round_service.commit_and_dispatch(session, dispatcher, round_id)
    return round_id


def remove_finished_work_dirs(session_factory: SessionFactory, settings: Settings) -> list[int]:
    """Deletes the work directories of rounds that have ended, or whose row is gone.

    A worker removes its round's directory once the round has ended; a worker killed between
    that round's last database write and the removal leaves it behind. The sweeper finishes
    the job. A directory of a round that is queued or running is never touched (a re-queued
    round resumes from its checkpoints there). Returns the round ids whose directory it removed.
    """
    parent = work_dir(settings, 0).parent
    if not parent.is_dir():
        return []
    found: dict[int, object] = {}
    for path in parent.iterdir():
        suffix = path.name.removeprefix(WORK_DIR_PREFIX)
        if path.is_dir() and path.name.startswith(WORK_DIR_PREFIX) and suffix.isdigit():
            found[int(suffix)] = path
    if not found:
        return []
    with session_factory() as session:
        alive = set(
            session.scalars(
                select(TrainingRound.id).where(
                    TrainingRound.id.in_(found), TrainingRound.status.not_in(FINISHED)
                )
            )
        )
        session.rollback()
    removed = sorted(rid for rid in found if rid not in alive)
    for rid in removed:
        shutil.rmtree(work_dir(settings, rid), ignore_errors=True)
    if removed:
        log.info("sweep: removed the work directories of ended rounds %s", removed)
    return removed


def sweep_and_schedule(
    session_factory: SessionFactory, settings: Settings, dispatcher: Dispatcher
) -> dict[str, Any]:
    """The periodic job of ``rounds.sweep``: :func:`sweep`, then :func:`maybe_schedule_round`."""
    result = sweep(session_factory, dispatcher)
    cleaned = remove_finished_work_dirs(session_factory, settings)
    scheduled = maybe_schedule_round(session_factory, settings, dispatcher)
    return {
        "redispatched": result.redispatched,
        "requeued": result.requeued,
        "failed": result.failed,
        "work_dirs_removed": cleaned,
        "scheduled": scheduled,
    }
