"""The state of a training round on the database: the claim, guarded updates, the heartbeat
and the stop check that :func:`worker.rounds.run_round` runs a round under.

A round goes from ``queued`` to a finished state::

    queued -> running -> evaluating -> succeeded
                 |            |
                 +------------+--> failed | cancelled

**Claim** (:func:`_claim`). In one transaction (row lock): a finished round is left alone, so a
second delivery of the task changes nothing; a ``running`` / ``evaluating`` round whose owner
is alive (fresh heartbeat, another task id) is left alone too; otherwise (queued, or the
owner's heartbeat is older than :data:`STALE_AFTER_S`, or this very task is redelivered after
its worker died) the round becomes ``running`` under this task's id, ``attempts`` goes up, and
after :data:`MAX_ATTEMPTS` it fails instead.

**Ownership.** Every later change of the round (:func:`_guarded_update`, :func:`_set`) applies
only while the round is still this task's and in the expected statuses. While the round runs,
a heartbeat thread (:class:`_Heartbeat`) touches ``updated_at`` every
:data:`HEARTBEAT_EVERY_S`; before every training step the round's status is read (at most once
per :data:`STOP_CHECK_EVERY_S`, :class:`_StopCheck`): ``cancelled`` in the database, or another
owner, stops the run. A round whose heartbeat stopped is re-queued by the sweeper
(:mod:`worker.round_schedule`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from backend.models import RoundStatus, TrainingRound
from backend.services.common import as_utc

log = logging.getLogger(__name__)

SessionFactory = Callable[[], Session]

#: A round is given up after this many claims (first run plus retries).
MAX_ATTEMPTS = 3
#: The running worker touches the round's ``updated_at`` this often.
HEARTBEAT_EVERY_S = 15.0
#: A running round whose ``updated_at`` is older than this has lost its worker.
STALE_AFTER_S = 300.0
#: The cancellation check reads the database at most this often.
STOP_CHECK_EVERY_S = 1.0

ACTIVE = (RoundStatus.running, RoundStatus.evaluating)
#: A round that has ended: its work directory is no longer needed.
FINISHED = (RoundStatus.succeeded, RoundStatus.failed, RoundStatus.cancelled)
#: Work directories of rounds live in ``<models_dir>/rounds/round-<id>``.
WORK_DIR_PREFIX = "round-"


def work_dir(settings: Any, round_id: int) -> Path:
    """The trainer's directory of a round (checkpoints, the adapter before it is published)."""
    return Path(settings.models_dir) / "rounds" / f"{WORK_DIR_PREFIX}{round_id}"


class RoundFailed(Exception):
    """The round cannot succeed; the message is stored as its error."""


class _NotOwner(Exception):
    """The round was cancelled, finished or taken over while this worker ran it."""


def _now() -> datetime:
    return datetime.now(UTC)


# ---------------------------------------------------------------------------- claim
@dataclass
class _Claim:
    round_id: int
    owner: str
    config: dict[str, Any]
    parent_version_id: int | None
    snapshot_max_vote_id: int
    attempt: int


def _claim(session_factory: SessionFactory, round_id: int, owner: str) -> _Claim | None:
    with session_factory() as session:
        rnd = session.scalars(
            select(TrainingRound).where(TrainingRound.id == round_id).with_for_update()
        ).first()
        if rnd is None:
            log.warning("round %s does not exist; nothing to do", round_id)
            return None
        status = RoundStatus(rnd.status)
        if status.finished:
            log.info("round %s already %s; nothing to do", round_id, status.value)
            return None
        now = _now()
        if status in ACTIVE:
            age = (now - (as_utc(rnd.updated_at) or now)).total_seconds()
            if rnd.celery_task_id != owner and age < STALE_AFTER_S:
                log.info(
                    "round %s is %s under task %s (alive); not taking it over",
                    round_id,
                    status.value,
                    rnd.celery_task_id,
                )
                return None
            log.warning(
                "round %s was %s under task %s, silent for %.0f s: resuming it",
                round_id,
                status.value,
                rnd.celery_task_id,
                age,
            )
        if rnd.attempts >= MAX_ATTEMPTS:
            rnd.status = RoundStatus.failed
            rnd.error = f"gave up after {rnd.attempts} attempts" + (
                f"; last error: {rnd.error}" if rnd.error else ""
            )
            rnd.finished_at = now
            rnd.updated_at = now
            session.commit()
            return None
        rnd.status = RoundStatus.running
        rnd.attempts = (rnd.attempts or 0) + 1
        rnd.celery_task_id = owner
        rnd.started_at = rnd.started_at or now
        rnd.updated_at = now
        rnd.error = None
        claim = _Claim(
            round_id=rnd.id,
            owner=owner,
            config=dict(rnd.config or {}),
            parent_version_id=rnd.parent_version_id,
            snapshot_max_vote_id=int(rnd.snapshot_max_vote_id or 0),
            attempt=rnd.attempts,
        )
        session.commit()
        return claim


def _guarded_update(
    session: Session, claim: _Claim, statuses: tuple[RoundStatus, ...], **values: Any
) -> bool:
    """Update the round only if it is still ours and in ``statuses``; True when it was."""
    values.setdefault("updated_at", _now())
    result = session.execute(
        update(TrainingRound)
        .where(
            TrainingRound.id == claim.round_id,
            TrainingRound.celery_task_id == claim.owner,
            TrainingRound.status.in_(statuses),
        )
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def _set(
    session_factory: SessionFactory, claim: _Claim, statuses: tuple[RoundStatus, ...], **values: Any
) -> bool:
    with session_factory() as session:
        ok = _guarded_update(session, claim, statuses, **values)
        session.commit()
        return ok


class _Heartbeat:
    """Touches the round's ``updated_at`` every :data:`HEARTBEAT_EVERY_S` while it runs."""

    def __init__(self, session_factory: SessionFactory, claim: _Claim) -> None:
        self._factory, self._claim = session_factory, claim
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"round-{claim.round_id}-heartbeat", daemon=True
        )
        self.lost = False

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_EVERY_S):
            try:
                if not _set(self._factory, self._claim, ACTIVE):
                    self.lost = True
                    return
            except Exception:  # noqa: BLE001 - a missed beat is retried on the next one
                log.exception("heartbeat of round %s failed", self._claim.round_id)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=HEARTBEAT_EVERY_S + 5)


class _StopCheck:
    """``should_stop`` for the trainer: the round was cancelled or is no longer ours."""

    def __init__(
        self, session_factory: SessionFactory, claim: _Claim, heartbeat: _Heartbeat
    ) -> None:
        self._factory, self._claim, self._hb = session_factory, claim, heartbeat
        self._checked = 0.0
        self.reason: str | None = None

    def __call__(self) -> bool:
        if self.reason is not None:
            return True
        if self._hb.lost:
            self.reason = "lost"
            return True
        if time.monotonic() - self._checked < STOP_CHECK_EVERY_S:
            return False
        self._checked = time.monotonic()
        with self._factory() as session:
            row = session.execute(
                select(TrainingRound.status, TrainingRound.celery_task_id).where(
                    TrainingRound.id == self._claim.round_id
                )
            ).first()
            session.rollback()
        if row is None or row[1] != self._claim.owner:
            self.reason = "lost"
        elif RoundStatus(row[0]) == RoundStatus.cancelled:
            self.reason = "cancelled"
        elif RoundStatus(row[0]) != RoundStatus.running:
            self.reason = "lost"
        return self.reason is not None


def _current_status(session_factory: SessionFactory, round_id: int) -> RoundStatus | None:
    with session_factory() as session:
        status = session.scalar(select(TrainingRound.status).where(TrainingRound.id == round_id))
        session.rollback()
    return RoundStatus(status) if status is not None else None
