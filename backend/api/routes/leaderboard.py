from __future__ import annotations

from fastapi import APIRouter, HTTPException

from backend.api.deps import AdminUser, SessionDep
from backend.schemas import LeaderboardEntry, LeaderboardPublic, WinRateEntry
from backend.services import rankings

router = APIRouter(prefix="/leaderboard", tags=["versions"])


@router.get("", response_model=LeaderboardPublic)
def get_leaderboard(session: SessionDep, admin: AdminUser) -> LeaderboardPublic:
    """Bradley-Terry score per version with a bootstrap 95% interval and win rates, from
    human votes between versions (cross-version pairs and A/B pairs). Candidates (versions
    under their A/B gate) are included and marked ``candidate: true``. ``win_rates`` is the
    head-to-head matrix: for each ordered pair of versions that met, the share of their
    battles the first won (ties half)."""
    try:
        board = rankings.leaderboard(session)
    except ImportError:
        raise HTTPException(503, detail="the leaderboard module is not installed") from None
    return LeaderboardPublic(
        data=[LeaderboardEntry(**r) for r in board["data"]],
        win_rates=[WinRateEntry(**w) for w in board["win_rates"]],
    )
