"""The leaderboard: Bradley-Terry over human votes between versions (cross-version and A/B
pairs), with candidates marked, and the head-to-head win-rate matrix."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, aliased

from backend.models import (
    Choice,
    Image,
    ModelVersion,
    Pair,
    PairKind,
    User,
    UserStatus,
    VersionStatus,
    Vote,
)

#: Pairs whose votes are battles between two versions.
BATTLE_KINDS = (PairKind.cross_version, PairKind.ab)


def cross_version_battles(session: Session) -> list[Any]:
    """One battle per left/right/tie vote on a pair of two versions (cross-version pairs, and
    the A/B pairs of candidates and published versions against their parents), by non-banned
    annotators. Both-bad and skip say nothing about which version is better and are left
    out."""
    from backend.leaderboard import Battle

    ia, ib = aliased(Image), aliased(Image)
    rows = session.execute(
        select(ia.version_id, ib.version_id, Vote.choice, Vote.winner_image_id, Pair.image_a_id)
        .select_from(Vote)
        .join(Pair, Pair.id == Vote.pair_id)
        .join(ia, ia.id == Pair.image_a_id)
        .join(ib, ib.id == Pair.image_b_id)
        .join(User, User.id == Vote.user_id)
        .where(
            Pair.kind.in_(BATTLE_KINDS),
            Vote.choice.in_([Choice.left, Choice.right, Choice.tie]),
            User.status == UserStatus.active,
        )
    ).all()
    battles = []
    for va, vb, choice, winner, image_a in rows:
        if va == vb:
            continue
        if choice == Choice.tie:
            battles.append(Battle(model_a=va, model_b=vb, outcome="tie"))
        else:
            battles.append(
                Battle(model_a=va, model_b=vb, outcome="a" if winner == image_a else "b")
            )
    return battles


def leaderboard(session: Session, *, n_bootstrap: int = 200, seed: int = 0) -> dict[str, Any]:
    """``{"data": rows, "win_rates": matrix}``: per version a Bradley-Terry score with its
    bootstrap 95% interval, win counts, and ``candidate`` (true for a version still under its
    A/B gate); and the head-to-head win rate of every ordered pair of versions that met."""
    from backend.leaderboard import bradley_terry, pairwise_win_rates

    battles = cross_version_battles(session)
    if not battles:
        return {"data": [], "win_rates": []}
    ratings = bradley_terry(battles, n_bootstrap=n_bootstrap, seed=seed)
    ids = [r.version_id for r in ratings]
    rows = {
        vid: (name, status)
        for vid, name, status in session.execute(
            select(ModelVersion.id, ModelVersion.name, ModelVersion.status).where(
                ModelVersion.id.in_(ids)
            )
        ).all()
    }
    games: dict[tuple[int, int], int] = {}
    for b in battles:
        if b.model_a != b.model_b:
            for key in ((b.model_a, b.model_b), (b.model_b, b.model_a)):
                games[key] = games.get(key, 0) + 1

    def status_of(vid: int) -> str:
        status = rows.get(vid, (None, None))[1]
        return str(getattr(status, "value", status))

    return {
        "data": [
            {
                "version_id": r.version_id,
                "name": rows.get(r.version_id, (str(r.version_id), None))[0],
                "status": status_of(r.version_id),
                "candidate": status_of(r.version_id) == VersionStatus.candidate.value,
                "score": r.score,
                "ci_low": r.ci_low,
                "ci_high": r.ci_high,
                "battles": r.battles,
                "wins": r.wins,
                "losses": r.losses,
                "ties": r.ties,
                "win_rate": r.win_rate,
            }
            for r in ratings
        ],
        "win_rates": [
            {"version_id": a, "opponent_id": b, "win_rate": rate, "battles": games[(a, b)]}
            for (a, b), rate in pairwise_win_rates(battles).items()
        ],
    }
