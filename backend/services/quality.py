"""Data quality: per-annotator reliability and flags, and the crowd's agreement.

One read of the non-skip votes feeds everything (:func:`quality_report`):

* each annotator's reliability (:func:`backend.agreement.annotator_reliability`: gold
  accuracy, agreement with the other annotators' majority, the bad-voter test), their share
  of implausibly fast votes (``latency_ms < fast_vote_ms``), and their flags
  (:func:`backend.agreement.flag_reasons`);
* Krippendorff's alpha overall and per annotator, and Cohen's kappa between annotators who
  share at least ``kappa_min_overlap`` pairs (:mod:`backend.agreement`).

Only the votes of *active* annotators count as a reference (the majority others are compared
with) and in alpha and kappa: banned and shadow-banned annotators still get a reliability,
measured against everyone else, but never move anyone's. Gold pairs are compared with their
answer; A/B pairs are left out (their sides are versions, not a preference on one model).

The report is cached per process, keyed by the data it was computed from (the votes' count
and largest id, the gold pairs and their answers, the non-active annotators, and the
settings), so listing users page after page or polling ``/stats`` costs three small key
queries. While votes stream in, the report is recomputed at most every
``PREFLOOP_QUALITY_MAX_AGE_SECONDS`` (a status change, a gold answer or other thresholds
recompute at once).
"""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from backend import agreement
from backend.models import Choice, Pair, PairKind, User, UserStatus, Vote
from backend.settings import Settings

#: Annotator pairs listed in ``/stats`` (the largest overlaps).
KAPPA_PAIRS_SHOWN = 50


def vote_code(choice: str, winner: int | None, image_a: int) -> str:
    """A vote in pair terms ("a", "b", "tie", "both_bad"), independent of the side order."""
    if choice in (Choice.left, Choice.right):
        return "a" if winner == image_a else "b"
    return str(choice)


@dataclass
class AnnotatorQuality:
    reliability: agreement.AnnotatorReliability | None
    fast_votes: int = 0
    timed_votes: int = 0
    alpha: float | None = None
    flags: list[str] = field(default_factory=list)


@dataclass
class QualityReport:
    votes: int
    alpha: float | None
    annotators: dict[int, AnnotatorQuality]
    kappa: list[tuple[int, int, int, float]]

    def flagged(self) -> set[int]:
        return {u for u, q in self.annotators.items() if q.flags}

    def summary(self) -> dict[str, Any]:
        """The agreement block of ``GET /stats`` (admins)."""
        return {
            "votes": self.votes,
            "krippendorff_alpha": self.alpha,
            "annotators": len(self.annotators),
            "flagged": sorted(self.flagged()),
            "cohen_kappa": [
                {"user_a": a, "user_b": b, "overlap": n, "kappa": k}
                for a, b, n, k in self.kappa[:KAPPA_PAIRS_SHOWN]
            ],
        }


def _compute(session: Session, settings: Settings, max_vote_id: int | None) -> QualityReport:
    q = (
        select(
            Vote.user_id,
            Vote.pair_id,
            Vote.choice,
            Vote.winner_image_id,
            Vote.latency_ms,
            Pair.image_a_id,
            Pair.gold_answer,
            User.status,
        )
        .join(Pair, Pair.id == Vote.pair_id)
        .join(User, User.id == Vote.user_id)
        .where(Vote.choice != Choice.skip, Pair.kind != PairKind.ab)
    )
    if max_vote_id is not None:
        q = q.where(Vote.id <= max_vote_id)
    rows = session.execute(q).all()
    timing: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    coded: list[tuple[int, int, Hashable, str | None, bool]] = []
    for r in rows:
        if r.latency_ms is not None:
            t = timing[r.user_id]
            t[1] += 1
            t[0] += settings.fast_vote_ms > 0 and r.latency_ms < settings.fast_vote_ms
        gold = str(r.gold_answer) if r.gold_answer is not None else None
        code = vote_code(r.choice, r.winner_image_id, r.image_a_id)
        coded.append((r.user_id, r.pair_id, code, gold, r.status == UserStatus.active))
    active_plain = [(u, p, c) for u, p, c, gold, active in coded if gold is None and active]
    loo = agreement.leave_one_out_majority(active_plain)
    plurality: dict[int, Hashable | None] = {}
    by_pair: dict[int, Counter[Hashable]] = defaultdict(Counter)
    for _u, p, c in active_plain:
        by_pair[p][c] += 1
    for p, counts in by_pair.items():
        top = counts.most_common(2)
        plurality[p] = None if len(top) > 1 and top[0][1] == top[1][1] else top[0][0]
    records = [
        agreement.VoteRecord(
            u,
            p,
            c,
            gold if gold is not None else (loo.get((u, p)) if active else plurality.get(p)),
            gold is not None,
        )
        for u, p, c, gold, active in coded
    ]
    reliability = {r.user_id: r for r in agreement.annotator_reliability(records)}
    alpha, alpha_by_user = agreement.annotator_alpha(active_plain)
    kappa = agreement.pairwise_kappa(active_plain, min_overlap=settings.kappa_min_overlap)
    annotators: dict[int, AnnotatorQuality] = {}
    for user_id in sorted(set(reliability) | set(timing)):
        fast, timed = timing.get(user_id, (0, 0))
        rel = reliability.get(user_id)
        annotators[user_id] = AnnotatorQuality(
            reliability=rel,
            fast_votes=fast,
            timed_votes=timed,
            alpha=alpha_by_user.get(user_id),
            flags=agreement.flag_reasons(
                rel, fast_votes=fast, timed_votes=timed, gold_floor=settings.gold_accuracy_floor
            ),
        )
    return QualityReport(votes=len(rows), alpha=alpha, annotators=annotators, kappa=kappa)


@dataclass
class _Cached:
    votes_key: tuple[Any, ...]
    structure_key: tuple[Any, ...]
    computed_at: float
    report: QualityReport


_cache: dict[str, _Cached] = {}
_lock = threading.Lock()


def quality_report(
    session: Session, settings: Settings, *, max_vote_id: int | None = None
) -> QualityReport:
    """The report over every vote (or those with ``id <= max_vote_id``, for a round's
    snapshot, never cached), cached per database (see the module docstring).

    The cached report is reused while the data it was computed from is unchanged; when only
    new votes arrived, for up to ``settings.quality_max_age_seconds`` more (so a busy server
    recomputes at most that often). A status change, a gold answer or other thresholds
    always recompute."""
    if max_vote_id is not None:
        return _compute(session, settings, max_vote_id)
    count, max_id = session.execute(select(func.count(), func.max(Vote.id))).one()
    gold = tuple(
        session.execute(
            select(
                func.count(Pair.gold_answer), func.count().filter(Pair.gold_answer == "a")
            ).where(Pair.gold_answer.is_not(None))
        ).one()
    )
    others = tuple(
        session.execute(
            select(User.id, User.status).where(User.status != UserStatus.active).order_by(User.id)
        ).all()
    )
    votes_key = (int(count or 0), max_id)
    structure_key = (
        gold,
        tuple((u, str(s)) for u, s in others),
        settings.fast_vote_ms,
        settings.gold_accuracy_floor,
        settings.kappa_min_overlap,
    )
    where = str(session.get_bind().engine.url)
    now = time.monotonic()
    with _lock:
        hit = _cache.get(where)
    if (
        hit is not None
        and hit.structure_key == structure_key
        and (hit.votes_key == votes_key or now - hit.computed_at < settings.quality_max_age_seconds)
    ):
        return hit.report
    report = _compute(session, settings, None)
    with _lock:
        _cache[where] = _Cached(votes_key, structure_key, now, report)
    return report
