"""A/B tests as rows: opening, tallying, and recording the first decision.

An :class:`~backend.models.ABTest` compares one version with its parent in blind pairs (kind
``ab``, ``Pair.ab_test_id``), in one of two phases:

- ``gate``: a candidate against its parent before it serves; decided by the sequential test
  :func:`backend.ab_test.decide` (``promote`` / ``reject`` / ``inconclusive``);
- ``live``: the published version against its parent while it serves; the monitor
  :func:`backend.ab_test.live_check` says when it is significantly worse (``rollback``).

The statistics (``backend/ab_test.py``) are pure; this module feeds them the votes and keeps
their first answer. **The first non-open state is final**: :func:`record_decision` is a
conditional ``UPDATE ... WHERE state = 'open'``, so of two concurrent checks only one records,
and votes that arrive afterwards (pairs served before the decision) never change it.

Observations, from the tested version's side: a left/right vote whose chosen image is the
tested version's is a win, the parent's a loss; a tie is a tie; both-bad and skip are not
observations. Votes of banned and shadow-banned annotators are left out. Only the first vote on a pair counts
(the pool serves an A/B pair to one annotator only, so a second is a rare race): every
observation is a fresh (prompt, seeds, annotator) draw, which the test's guarantee assumes.

The gate replays its votes in id order and stops at the first prefix that leaves ``open``, so
the recorded decision is the one a check after every single vote would have made, whenever
the check actually runs (after each A/B vote in the API, and periodically in ``ab.check``).
The live monitor has no budget and may run for weeks: it reads one aggregate, which its
anytime-valid guarantee allows (it holds whenever it is looked at).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import case, func, select, update
from sqlalchemy.orm import Session, aliased

from backend.ab_test import (
    ABDecision,
    ABSettings,
    ABTally,
    Outcome,
    decide,
    live_check,
    live_log_evalue,
)
from backend.models import (
    ABPhase,
    ABState,
    ABTest,
    Choice,
    Image,
    ModelVersion,
    Pair,
    PairKind,
    User,
    UserStatus,
    Vote,
)

OBSERVED_CHOICES = (Choice.left, Choice.right, Choice.tie)


def settings_snapshot(ab: ABSettings) -> dict[str, Any]:
    return {
        "alpha": ab.alpha,
        "min_effect": ab.min_effect,
        "budget": ab.budget,
        "power": ab.power,
    }


def settings_of(test: ABTest) -> ABSettings:
    """The settings a test was opened with (a later change of ``PREFLOOP_AB_*`` applies to
    tests opened later, never to a running one)."""
    s = test.settings or {}
    defaults = ABSettings()
    return ABSettings(
        alpha=float(s.get("alpha", defaults.alpha)),
        min_effect=float(s.get("min_effect", defaults.min_effect)),
        budget=int(s.get("budget", defaults.budget)),
        power=float(s.get("power", defaults.power)),
    )


def get_test(session: Session, version_id: int, phase: ABPhase) -> ABTest | None:
    return session.scalars(
        select(ABTest).where(ABTest.version_id == version_id, ABTest.phase == phase)
    ).first()


def get_test_by_id(session: Session, test_id: int, *, for_update: bool = False) -> ABTest | None:
    q = select(ABTest).where(ABTest.id == test_id)
    if for_update:
        q = q.with_for_update()
    return session.scalars(q).first()


def open_test(
    session: Session,
    *,
    version: ModelVersion,
    phase: ABPhase,
    policy: str,
    ab: ABSettings,
) -> ABTest | None:
    """Open (or return) ``version``'s test of ``phase`` against its parent; None when it has
    no parent. A ``closed`` live test (the version stopped serving and now serves again) is
    reopened with its votes: the monitor is anytime-valid, so it may simply continue. Any
    other decided test stays as it was (a version rolled back by the monitor and published
    again by an admin is not rolled back a second time)."""
    if version.parent_id is None:
        return None
    test = get_test(session, version.id, phase)
    if test is not None:
        if phase == ABPhase.live and ABState(test.state) == ABState.closed:
            test.state = ABState.open
            test.reason = None
            test.action = None
            test.decided_at = None
            session.flush()
        return test
    test = ABTest(
        version_id=version.id,
        parent_id=version.parent_id,
        phase=phase,
        state=ABState.open,
        policy=policy,
        settings=settings_snapshot(ab),
        wins=0,
        losses=0,
        ties=0,
    )
    session.add(test)
    session.flush()
    return test


def open_tests(session: Session) -> list[ABTest]:
    return list(
        session.scalars(select(ABTest).where(ABTest.state == ABState.open).order_by(ABTest.id))
    )


# ---------------------------------------------------------------------------- tallies
def _observed(test_id: int) -> Any:
    winner = aliased(Image)
    return (
        select(Vote.id, Vote.pair_id, Vote.choice, winner.version_id)
        .select_from(Vote)
        .join(Pair, Pair.id == Vote.pair_id)
        .join(User, User.id == Vote.user_id)
        .outerjoin(winner, winner.id == Vote.winner_image_id)
        .where(
            Pair.ab_test_id == test_id,
            Pair.kind == PairKind.ab,
            Vote.choice.in_(OBSERVED_CHOICES),
            User.status == UserStatus.active,
        )
    )


def _outcome(choice: Any, winner_version: int | None, version_id: int) -> Outcome:
    if Choice(choice) == Choice.tie:
        return "tie"
    return "win" if winner_version == version_id else "loss"


def outcomes(session: Session, test: ABTest) -> list[Outcome]:
    """The test's observations in vote order, one per pair (its first vote)."""
    seen: set[int] = set()
    out: list[Outcome] = []
    for _vote_id, pair_id, choice, winner_version in session.execute(
        _observed(test.id).order_by(Vote.id)
    ):
        if pair_id in seen:
            continue
        seen.add(pair_id)
        out.append(_outcome(choice, winner_version, test.version_id))
    return out


def current_tally(session: Session, test: ABTest) -> ABTally:
    """Every observation so far, as one aggregate (one vote per pair)."""
    sub = _observed(test.id).subquery()
    first = select(func.min(sub.c.id).label("id")).group_by(sub.c.pair_id).subquery("first_votes")
    win = case(
        (sub.c.choice == Choice.tie.value, "tie"),
        (sub.c.version_id == test.version_id, "win"),
        else_="loss",
    ).label("outcome")
    counts: dict[str, int] = dict(
        session.execute(
            select(win, func.count()).join(first, first.c.id == sub.c.id).group_by(win)
        ).all()
    )
    return ABTally(
        wins=int(counts.get("win", 0)),
        losses=int(counts.get("loss", 0)),
        ties=int(counts.get("tie", 0)),
    )


@dataclass(frozen=True)
class Evaluation:
    """What the votes say. ``state`` is the first non-open state (or ``open``); ``tally`` the
    votes it was reached on (all votes while open); ``later_votes`` the observations after it."""

    state: ABState
    tally: ABTally
    reason: str
    later_votes: int = 0
    decision: ABDecision | None = None
    log_evalue: float | None = None


def first_decision(observations: Iterable[Outcome], ab: ABSettings) -> Evaluation:
    """Replay ``observations`` through :func:`~backend.ab_test.decide`; stop at the first
    state that is not ``open``."""
    obs = list(observations)
    tally = ABTally()
    d = decide(tally, ab)
    for i, o in enumerate(obs):
        tally = tally.record(o)
        d = decide(tally, ab)
        if d.state != "open":
            return Evaluation(ABState(d.state), tally, d.reason, len(obs) - i - 1, decision=d)
    return Evaluation(ABState.open, tally, d.reason, 0, decision=d)


def live_evaluation(tally: ABTally, ab: ABSettings) -> Evaluation:
    log_e = live_log_evalue(tally, ab)
    rate = tally.win_rate
    rate_txt = "no votes yet" if rate is None else f"win rate {rate:.3f} over {tally.votes} votes"
    if live_check(tally, ab):
        reason = (
            f"rollback: the published version is significantly worse than its parent "
            f"({rate_txt}); log e-value {log_e:.3f} reached log(1/alpha) = {ab.log_upper:.3f}, "
            f"false-rollback rate <= {ab.alpha:g}"
        )
        return Evaluation(ABState.rollback, tally, reason, log_evalue=log_e)
    reason = f"open: {rate_txt}; log e-value {log_e:.3f}, rolls back at {ab.log_upper:.3f}"
    return Evaluation(ABState.open, tally, reason, log_evalue=log_e)


def evaluate(session: Session, test: ABTest) -> Evaluation:
    ab = settings_of(test)
    if ABPhase(test.phase) == ABPhase.gate:
        return first_decision(outcomes(session, test), ab)
    return live_evaluation(current_tally(session, test), ab)


# ---------------------------------------------------------------------------- decisions
def record_decision(
    session: Session,
    test: ABTest,
    state: ABState,
    *,
    tally: ABTally | None,
    reason: str,
    action: str | None,
) -> bool:
    """Record ``state`` on an open test (conditional on its still being open) and take its
    pairs out of the pool; True when this call recorded it. ``tally`` None keeps the stored
    one (a test closed without a statistical decision)."""
    values: dict[str, Any] = {
        "state": state,
        "reason": reason[:10000],
        "action": action,
        "decided_at": datetime.now(UTC),
    }
    if tally is not None:
        values.update(wins=tally.wins, losses=tally.losses, ties=tally.ties)
    result = session.execute(
        update(ABTest)
        .where(ABTest.id == test.id, ABTest.state == ABState.open)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if not result.rowcount:  # type: ignore[attr-defined]
        return False
    close_pairs(session, test.id)
    session.refresh(test)
    return True


def set_action(session: Session, test: ABTest, action: str, reason: str | None = None) -> None:
    test.action = action
    if reason is not None:
        test.reason = reason[:10000]
    session.flush()


def close_pairs(session: Session, test_id: int) -> int:
    """Stop serving the test's pairs; returns how many were active."""
    result = session.execute(
        update(Pair)
        .where(Pair.ab_test_id == test_id, Pair.active.is_(True))
        .values(active=False)
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]
