from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter, status

from backend.api.deps import AdminUser, CurrentUser, IdPath, Limit, Offset, SessionDep, StateDep
from backend.schemas import UserCreate, UserPublic, UsersPublic, UserUpdate, UserWithStats
from backend.services import users as user_service

router = APIRouter(prefix="/users", tags=["users"])


@router.post("", response_model=UserPublic, status_code=status.HTTP_201_CREATED)
def create_user(
    body: UserCreate, session: SessionDep, state: StateDep, admin: AdminUser
) -> UserPublic:
    user = user_service.create_user(
        session,
        state.passwords,
        username=body.username,
        password=body.password,
        role=body.role,
        daily_cap=body.daily_cap,
        weekly_cap=body.weekly_cap,
    )
    session.commit()
    return UserPublic.model_validate(user)


@router.get("", response_model=UsersPublic)
def list_users(
    session: SessionDep, state: StateDep, admin: AdminUser, offset: Offset = 0, limit: Limit = 100
) -> UsersPublic:
    """Users with their volume and reliability (gold accuracy, agreement with the other
    annotators' majority, the bad-voter test, implausibly fast votes, Krippendorff's alpha)
    and the flags that follow (docs/data-quality.md)."""
    day = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    rows, count = user_service.list_users_with_stats(
        session, state.settings, offset=offset, limit=limit, since=day
    )
    data = []
    for r in rows:
        q = r.quality
        rel = q.reliability if q else None
        data.append(
            UserWithStats(
                **UserPublic.model_validate(r.user).model_dump(),
                votes=r.votes,
                votes_today=r.votes_today,
                served=r.served,
                gold_seen=rel.gold_seen if rel else 0,
                gold_correct=rel.gold_correct if rel else 0,
                gold_accuracy=rel.gold_accuracy if rel else None,
                agreement_with_majority=rel.agreement_with_majority if rel else None,
                p_value=rel.p_value if rel else None,
                outlier=rel.outlier if rel else None,
                fast_votes=q.fast_votes if q else 0,
                timed_votes=q.timed_votes if q else 0,
                krippendorff_alpha=q.alpha if q else None,
                flags=q.flags if q else [],
            )
        )
    return UsersPublic(data=data, count=count)


@router.get("/me", response_model=UserPublic)
def me(user: CurrentUser) -> UserPublic:
    return UserPublic.model_validate(user)


@router.patch("/{user_id}", response_model=UserPublic)
def update_user(
    user_id: IdPath, body: UserUpdate, session: SessionDep, state: StateDep, admin: AdminUser
) -> UserPublic:
    """Ban, shadow-ban or unban (``status``: ``banned`` / ``shadow_banned`` / ``active``),
    change role, caps or password."""
    user = user_service.update_user(
        session,
        state.passwords,
        user_id,
        acting_user_id=admin.id,
        changes=body.model_dump(exclude_unset=True),
    )
    session.commit()
    return UserPublic.model_validate(user)
