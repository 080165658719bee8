from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Body, HTTPException, Query, status
from pydantic import ValidationError

from backend.api.deps import MAX_ID, AdminUser, IdPath, Limit, Offset, SessionDep, StateDep
from backend.api.errors import _json_safe_errors
from backend.credit_curve import DEFAULT_POINTS, BadSchedule, ScheduleNotFound, credit_curve
from backend.models import RoundStatus
from backend.round_config import RoundConfig, Scheme, defaults_for, resolve_config
from backend.schemas import (
    CreditCurvePublic,
    RoundAccepted,
    RoundCreate,
    RoundMetricPublic,
    RoundMetricsPublic,
    RoundPublic,
    RoundsPublic,
)
from backend.services import rounds as round_service
from backend.text_input import NO_NUL_PATTERN
from worker.alignment.credit import UnknownCreditSchemeError

log = logging.getLogger(__name__)
router = APIRouter(prefix="/rounds", tags=["rounds"])


@router.post("", response_model=RoundAccepted, status_code=status.HTTP_202_ACCEPTED)
def create_round(
    session: SessionDep,
    state: StateDep,
    admin: AdminUser,
    body: Annotated[RoundCreate | None, Body()] = None,
) -> RoundAccepted:
    """Queue a training round (config overrides validated: a bad value is a 422 naming it).
    The round is committed first, then handed to the workers."""
    body = body or RoundCreate()
    base_model = round_service.base_model_for(
        session, body.parent_version_id, state.settings.base_model
    )
    try:
        config = resolve_config(body.config, base_model)
    except ValidationError as exc:
        errors = _json_safe_errors(exc.errors())
        for e in errors:
            e["loc"] = ["body", "config", *e["loc"]]
        raise HTTPException(422, detail=errors) from None
    rnd = round_service.create_round(
        session, config, created_by=admin.id, parent_version_id=body.parent_version_id
    )
    round_id = rnd.id
    round_service.commit_and_dispatch(session, state.dispatcher, round_id)
    return RoundAccepted(round_id=round_id, status=RoundStatus.queued)


@router.get("/config-schema")
def config_schema(admin: AdminUser) -> dict[str, Any]:
    """JSON Schema of the round config (every field optional in ``POST /rounds``)."""
    return RoundConfig.model_json_schema()


@router.get("/config-defaults")
def config_defaults(
    session: SessionDep,
    state: StateDep,
    admin: AdminUser,
    parent_version_id: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
) -> dict[str, Any]:
    """The config a round gets with no overrides: the defaults for the family of its base model
    (the serving version's, or ``parent_version_id``'s)."""
    base_model = round_service.base_model_for(session, parent_version_id, state.settings.base_model)
    return {"base_model": base_model, "config": defaults_for(base_model)}


@router.get(
    "/credit",
    response_model=CreditCurvePublic,
    responses={
        404: {"description": "No scheduler config for the base model on the API's machine."},
        422: {
            "description": "An unknown scheme (the detail names the known ones), or a "
            "scheduler config that cannot be read or gives no finite credit."
        },
    },
)
def credit(
    session: SessionDep,
    state: StateDep,
    admin: AdminUser,
    scheme: Annotated[Scheme, Query(description="The credit scheme (as a round's config).")] = (
        "dde"
    ),
    base_model: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=1024,
            pattern=NO_NUL_PATTERN,
            description="builtin:shapes, a local diffusers checkpoint or a hub id in the local "
            "cache; default: the serving version's base model.",
        ),
    ] = None,
    points: Annotated[
        int, Query(ge=2, le=100_000, description="At most this many points (averaged runs).")
    ] = DEFAULT_POINTS,
) -> CreditCurvePublic:
    """The credit the scheme gives each timestep of the base model's noise schedule (its
    ``scheduler/scheduler_config.json``): the mean-1 weight W and the sampling density, at
    most ``points`` points for a plot (the dashboard's, beside the start-round form)."""
    if base_model is None:
        base_model = round_service.base_model_for(session, None, state.settings.base_model)
    try:
        curve = credit_curve(scheme, base_model, points)
    except UnknownCreditSchemeError as exc:
        raise HTTPException(422, detail=str(exc)) from None
    except ScheduleNotFound as exc:
        raise HTTPException(404, detail=str(exc)) from None
    except BadSchedule as exc:
        raise HTTPException(422, detail=str(exc)) from None
    return CreditCurvePublic(**vars(curve))


@router.get("", response_model=RoundsPublic)
def list_rounds(
    session: SessionDep,
    admin: AdminUser,
    offset: Offset = 0,
    limit: Limit = 100,
    status_: Annotated[RoundStatus | None, Query(alias="status")] = None,
) -> RoundsPublic:
    rows, count = round_service.list_rounds(session, offset=offset, limit=limit, status=status_)
    return RoundsPublic(data=[RoundPublic.model_validate(r) for r in rows], count=count)


@router.get("/{round_id}", response_model=RoundPublic)
def get_round(round_id: IdPath, session: SessionDep, admin: AdminUser) -> RoundPublic:
    return RoundPublic.model_validate(round_service.get_round(session, round_id))


@router.get("/{round_id}/metrics", response_model=RoundMetricsPublic)
def get_round_metrics(
    round_id: IdPath,
    session: SessionDep,
    admin: AdminUser,
    after_step: Annotated[int, Query(ge=-1, le=2**31 - 1)] = -1,
    limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
) -> RoundMetricsPublic:
    """The logged steps (loss curves), for live polling with ``after_step``."""
    rows = round_service.round_metrics(session, round_id, after_step=after_step, limit=limit)
    return RoundMetricsPublic(data=[RoundMetricPublic.model_validate(r) for r in rows])


@router.post("/{round_id}/cancel", response_model=RoundPublic)
def cancel_round(
    round_id: IdPath, session: SessionDep, state: StateDep, admin: AdminUser
) -> RoundPublic:
    """Cancel a queued or running round; 409 when it already finished."""
    rnd = round_service.cancel_round(session, round_id)
    session.commit()
    try:
        state.dispatcher.cancel_round(rnd.id, rnd.celery_task_id)
    except Exception:  # noqa: BLE001 - the worker also sees the status and stops
        log.exception("revoking round %s failed", rnd.id)
    return RoundPublic.model_validate(rnd)
