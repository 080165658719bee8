"""Dashboard numbers: one grouped query per table, no per-row work."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from backend.models import (
    Image,
    ModelVersion,
    Pair,
    Prompt,
    TrainingRound,
    User,
    UserRole,
    Vote,
)


def user_stats(session: Session, user_id: int, now: datetime | None = None) -> dict[str, int]:
    now = now or datetime.now(UTC)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    total, today = session.execute(
        select(func.count(), func.count().filter(Vote.created_at >= day)).where(
            Vote.user_id == user_id
        )
    ).one()
    return {"votes": int(total), "votes_today": int(today)}


#: Hours of ``votes_per_hour`` in the admin totals (the dashboard's chart).
VOTES_PER_HOUR_WINDOW = 24


def votes_per_hour(
    session: Session, hours: int = VOTES_PER_HOUR_WINDOW, now: datetime | None = None
) -> list[dict[str, Any]]:
    """Votes in each of the last ``hours`` clock hours (UTC), oldest first, the current hour
    last, hours without votes included: ``[{"hour": "2026-12-01T03:00:00+00:00", "votes": 12}]``.
    Bucketed here rather than in SQL, the same on PostgreSQL and SQLite."""
    now = (now or datetime.now(UTC)).astimezone(UTC)
    last = now.replace(minute=0, second=0, microsecond=0)
    first = last - timedelta(hours=hours - 1)
    counts = [0] * hours
    for (created,) in session.execute(select(Vote.created_at).where(Vote.created_at >= first)):
        created = created if created.tzinfo else created.replace(tzinfo=UTC)
        index = int((created - first).total_seconds() // 3600)
        if 0 <= index < hours:
            counts[index] += 1
    return [
        {"hour": (first + timedelta(hours=i)).isoformat(), "votes": n} for i, n in enumerate(counts)
    ]


def global_stats(session: Session, now: datetime | None = None) -> dict[str, Any]:
    now = now or datetime.now(UTC)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)

    def grouped(col: Any, *where: Any) -> dict[str, int]:
        q = select(col, func.count()).group_by(col)
        for w in where:
            q = q.where(w)
        return {str(getattr(k, "value", k)): int(n) for k, n in session.execute(q).all()}

    votes_total, votes_today, voters = session.execute(
        select(
            func.count(),
            func.count().filter(Vote.created_at >= day),
            func.count(func.distinct(Vote.user_id)),
        )
    ).one()
    return {
        "users": grouped(User.role),
        "annotators_active_today": int(
            session.scalar(
                select(func.count(func.distinct(Vote.user_id))).where(Vote.created_at >= day)
            )
            or 0
        ),
        "prompts": int(session.scalar(select(func.count()).select_from(Prompt)) or 0),
        "images": int(session.scalar(select(func.count()).select_from(Image)) or 0),
        "pairs": grouped(Pair.kind),
        "pairs_active": int(
            session.scalar(select(func.count()).select_from(Pair).where(Pair.active.is_(True))) or 0
        ),
        "votes": int(votes_total),
        "votes_today": int(votes_today),
        "voters": int(voters),
        "votes_by_choice": grouped(Vote.choice),
        "versions": grouped(ModelVersion.status),
        "rounds": grouped(TrainingRound.status),
        "votes_per_hour": votes_per_hour(session, now=now),
        "admins": int(
            session.scalar(
                select(func.count()).select_from(User).where(User.role == UserRole.admin)
            )
            or 0
        ),
    }
