from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request, Response, status
from sqlalchemy import Connection, bindparam, select, true

from backend.api.deps import (
    ActiveUser,
    BearerClaims,
    active_user,
    run_hot,
    valid_user_id,
    writes,
)
from backend.api.fastjson import json_response
from backend.api.state import AppState
from backend.models import User
from backend.schemas import PairPublic
from backend.security import TokenClaims
from backend.services import pairs as pair_service

router = APIRouter(prefix="/pairs", tags=["annotation"])


_users = User.__table__
_caps = pair_service.caps_subquery()
#: The user check of :func:`~backend.api.deps.check_user` and the cap counts in one statement.
_USER_AND_CAPS = (
    select(
        _users.c.status,
        _users.c.daily_cap,
        _users.c.weekly_cap,
        _caps.c.today,
        _caps.c.this_week,
        _caps.c.oldest,
        _users.c.token_version,
    )
    .select_from(_users)
    .join(_caps, true())
    .where(_users.c.id == bindparam("user_id"))
)


@dataclass(frozen=True, slots=True)
class _Checked:
    user: ActiveUser
    counts: pair_service.CapCounts
    now: datetime


def _check_user_and_count(conn: Connection, claims: TokenClaims) -> _Checked:
    now = datetime.now(UTC)
    row = (
        conn.execute(
            _USER_AND_CAPS, {"user_id": claims.user_id, **pair_service.cap_window(now)}
        ).first()
        if valid_user_id(claims)
        else None
    )
    user = active_user(row, claims)  # 401 / 403 first, as before
    assert row is not None  # active_user raised otherwise
    return _Checked(user, pair_service.CapCounts.from_row(row[3], row[4], row[5]), now)


def _serve(conn: Connection, checked: _Checked, state: AppState) -> pair_service.ServedPair | None:
    s = state.settings
    user = checked.user
    return pair_service.serve_next_pair(
        conn,
        user_id=user.id,
        daily_cap=user.daily_cap if user.daily_cap is not None else s.daily_vote_cap,
        weekly_cap=user.weekly_cap if user.weekly_cap is not None else s.weekly_vote_cap,
        gold_fraction=s.gold_fraction,
        now=checked.now,
        counts=checked.counts,
    )


@router.get(
    "/next",
    response_model=PairPublic,
    responses={
        204: {"description": "No pair is ready; retry after `Retry-After` seconds."},
        429: {"description": "Daily or weekly cap reached (`Retry-After`)."},
    },
)
@writes
async def next_pair(claims: BearerClaims, request: Request) -> Any:
    """A pair this annotator has never been served, sides in random order, no version shown."""
    state: AppState = request.app.state.prefloop
    # One hop, three statements: user check (401/403) with the cap counts (429), pick,
    # assignment (committed).
    served = await run_hot(state, claims, _serve, state, check=_check_user_and_count)
    if served is None:
        return Response(
            status_code=status.HTTP_204_NO_CONTENT,
            headers={"Retry-After": str(state.settings.retry_after_seconds)},
        )
    state.metrics.pair_served(served.kind.value)
    url = state.signer.url
    return json_response(
        {
            "pair_id": served.pair_id,
            "prompt": served.prompt,
            "left": {"image_id": served.left_image_id, "url": url(served.left_image_id)},
            "right": {"image_id": served.right_image_id, "url": url(served.right_image_id)},
        }
    )
