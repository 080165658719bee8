from __future__ import annotations

from fastapi import APIRouter

from backend.api.deps import CurrentUser, SessionDep, StateDep
from backend.models import UserRole
from backend.schemas import MyStats, StatsPublic
from backend.services import stats as stats_service
from backend.services.quality import quality_report

router = APIRouter(prefix="/stats", tags=["stats"])


@router.get("", response_model=StatsPublic)
def get_stats(session: SessionDep, state: StateDep, user: CurrentUser) -> StatsPublic:
    """Your own progress; admins also get the dataset totals, with ``agreement``: Krippendorff's
    alpha over the active annotators' votes, the flagged annotators, and Cohen's kappa of the
    annotator pairs that share enough pairs (docs/data-quality.md)."""
    me = MyStats(**stats_service.user_stats(session, user.id))
    totals = None
    if user.role == UserRole.admin:
        totals = stats_service.global_stats(session)
        totals["agreement"] = quality_report(session, state.settings).summary()
    return StatsPublic(me=me, totals=totals)
