from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response, status

from backend.api.deps import BearerClaims, run_hot, writes
from backend.api.fastjson import json_response
from backend.api.state import AppState
from backend.schemas import PairPublic
from backend.services import annotation

router = APIRouter(prefix="/pairs", tags=["annotation"])


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
    served = await run_hot(state, annotation.next_pair, claims, state.settings)
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
