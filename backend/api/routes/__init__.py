"""One module per resource; :data:`api_router` mounts them under ``/api/v1``."""

from fastapi import APIRouter

from backend.api.routes import (
    auth,
    datasets,
    gold,
    images,
    leaderboard,
    pairs,
    prompts,
    rounds,
    stats,
    users,
    versions,
    votes,
)

api_router = APIRouter(prefix="/api/v1")
# The annotation hot paths first: routes are matched in order, and these two take nearly all
# of the traffic (their paths overlap no other route, so the order changes nothing else).
for _module in (
    pairs,
    votes,
    auth,
    users,
    images,
    prompts,
    rounds,
    versions,
    leaderboard,
    datasets,
    gold,
    stats,
):
    api_router.include_router(_module.router)
