from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, status
from starlette.background import BackgroundTask

from backend.api.ab_checks import check_after_vote
from backend.api.deps import BearerClaims, run_hot
from backend.api.fastjson import json_response
from backend.api.state import AppState
from backend.schemas import VoteCreate, VotePublic
from backend.services import annotation

router = APIRouter(prefix="/votes", tags=["annotation"])


@router.post(
    "",
    response_model=VotePublic,
    status_code=status.HTTP_201_CREATED,
    responses={
        200: {"model": VotePublic, "description": "A repeat of a stored vote: the same vote_id."},
        404: {"description": "Unknown pair."},
        409: {
            "description": "Contradicts your earlier vote, reuses a client_vote_id on "
            "another pair, or the pair was never served to you."
        },
    },
)
async def submit_vote(body: VoteCreate, claims: BearerClaims, request: Request) -> Any:
    """Store a vote. 201 when stored now; 200 with the same ``vote_id`` when the same
    submission (same ``client_vote_id``, or same pair and choice) was already stored. A
    2xx answer means the vote is committed."""
    state: AppState = request.app.state.prefloop
    # One hop: user check (401/403), lookup, insert (committed before it returns). The
    # answer is built only after that.
    outcome = await run_hot(
        state,
        annotation.submit_vote,
        claims,
        body.pair_id,
        body.choice,
        body.client_vote_id,
        body.latency_ms,
    )
    if outcome.created:
        state.metrics.vote_stored(outcome.choice.value)
    response = json_response(
        {
            "vote_id": outcome.vote_id,
            "pair_id": outcome.pair_id,
            "choice": outcome.choice.value,
            "duplicate": not outcome.created,
        },
        status.HTTP_201_CREATED if outcome.created else status.HTTP_200_OK,
    )
    if outcome.created and outcome.ab_test_id is not None:
        # An A/B vote: check the test's decision after the response is sent.
        response.background = BackgroundTask(check_after_vote, state, outcome.ab_test_id)
    return response
