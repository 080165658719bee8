from __future__ import annotations

import hashlib
from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Query, Request, Response, status

from backend.api.deps import AdminUser, IdPath, Limit, Offset, SessionDep, StateDep
from backend.models import VersionStatus
from backend.schemas import (
    Message,
    VersionABPublic,
    VersionActionPublic,
    VersionPublic,
    VersionReject,
    VersionRollback,
    VersionSamplePublic,
    VersionSamplesPublic,
    VersionsPublic,
)
from backend.services import publishing
from backend.services import versions as version_service

router = APIRouter(prefix="/versions", tags=["versions"])


@router.get("", response_model=VersionsPublic)
def list_versions(
    session: SessionDep,
    admin: AdminUser,
    offset: Offset = 0,
    limit: Limit = 100,
    status: Annotated[VersionStatus | None, Query()] = None,
) -> VersionsPublic:
    rows, count = version_service.list_versions(session, offset=offset, limit=limit, status=status)
    return VersionsPublic(data=[VersionPublic.model_validate(v) for v in rows], count=count)


@router.get("/{version_id}", response_model=VersionPublic)
def get_version(version_id: IdPath, session: SessionDep, admin: AdminUser) -> VersionPublic:
    return VersionPublic.model_validate(version_service.get_version(session, version_id))


def _action(result: publishing.ActionResult) -> VersionActionPublic:
    return VersionActionPublic.model_validate(
        {
            **VersionPublic.model_validate(result.version).model_dump(),
            "message": result.message,
            "notes": result.notes,
        }
    )


_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": Message, "description": "Unknown version."}
}


@router.post("/{version_id}/publish", response_model=VersionActionPublic, responses=_NOT_FOUND)
def publish_version(
    version_id: IdPath, session: SessionDep, state: StateDep, admin: AdminUser
) -> VersionActionPublic:
    """Make this the serving version, atomically retiring the current one (idempotent).

    An admin can always publish, whatever the publish policy. A candidate whose A/B gate is
    still open is published too: the gate is closed as ``overridden`` (its tally kept, its
    pairs no longer served), and ``notes`` says so. A live A/B test against the version's
    parent then starts."""
    result = publishing.publish_version(session, version_id, state.settings, by="an admin")
    session.commit()
    return _action(result)


@router.post(
    "/{version_id}/retire",
    response_model=VersionActionPublic,
    responses={**_NOT_FOUND, 409: {"model": Message, "description": "The serving version."}},
)
def retire_version(
    version_id: IdPath, session: SessionDep, admin: AdminUser
) -> VersionActionPublic:
    """Retire a candidate (closing an open A/B gate as ``overridden``); 409 for the serving
    version (roll it back or publish another one first)."""
    result = publishing.reject_version(session, version_id, by="an admin")
    session.commit()
    return _action(result)


@router.post(
    "/{version_id}/reject",
    response_model=VersionActionPublic,
    responses={**_NOT_FOUND, 409: {"model": Message, "description": "The serving version."}},
)
def reject_version(
    version_id: IdPath,
    session: SessionDep,
    admin: AdminUser,
    body: Annotated[VersionReject | None, Body()] = None,
) -> VersionActionPublic:
    """Reject a candidate: retire it, with an optional ``reason`` kept in its metrics
    (``rejected_reason``). Its open A/B gate is closed as ``overridden``. 409 for the serving
    version."""
    reason = body.reason if body is not None else None
    result = publishing.reject_version(
        session, version_id, by="an admin", reason=reason or "rejected by an admin"
    )
    session.commit()
    return _action(result)


@router.post(
    "/{version_id}/rollback",
    response_model=VersionActionPublic,
    responses={
        **_NOT_FOUND,
        409: {
            "model": Message,
            "description": "The version is not the serving version, or has no parent.",
        },
    },
)
def rollback_version(
    version_id: IdPath,
    session: SessionDep,
    state: StateDep,
    admin: AdminUser,
    body: Annotated[VersionRollback | None, Body()] = None,
) -> VersionActionPublic:
    """Roll the serving version back: publish its parent again. The reason (optional) is kept
    in the version's metrics (``rolled_back``) and on its live A/B test. 409 when the version
    is not the serving one, or has no parent."""
    reason = body.reason if body is not None else None
    result = publishing.rollback_version(
        session, version_id, state.settings, by="an admin", reason=reason
    )
    session.commit()
    return _action(result)


@router.get("/{version_id}/ab", response_model=VersionABPublic, responses=_NOT_FOUND)
def get_version_ab(
    version_id: IdPath, session: SessionDep, state: StateDep, admin: AdminUser
) -> VersionABPublic:
    """The version's blind A/B tests against its parent: the ``gate`` (a candidate, before it
    serves) and the ``live`` monitor (after publishing), each with battles, wins, losses,
    ties, the win rate with its 95% interval, the state (``open`` until the first decision,
    which is final), the votes left in the budget, the reason and what was done; plus the
    metric policy's verdict when the version has the metric. Poll it to follow a decision."""
    return VersionABPublic.model_validate(publishing.ab_report(session, version_id, state.settings))


# A version's samples are rendered before its row exists and not rewritten afterwards, but a
# re-render would reuse the URLs: revalidate by ETag (the content's sha256) after an hour.
SAMPLES_CACHE_CONTROL = "private, max-age=3600"


def _sample_url(version_id: int, filename: str) -> str:
    return f"/api/v1/versions/{version_id}/samples/{filename}"


@router.get(
    "/{version_id}/samples",
    response_model=VersionSamplesPublic,
    responses={
        404: {
            "model": Message,
            "description": "Unknown version, or a version without validation samples.",
        }
    },
)
def get_version_samples(
    version_id: IdPath, session: SessionDep, state: StateDep, admin: AdminUser
) -> VersionSamplesPublic:
    """The validation grid the round that made this version rendered: each prompt drawn by
    the parent and by this version with the same seed, and the composite ``grid.png`` (one
    row per prompt, parent | candidate)."""
    samples = version_service.get_samples(session, state.artifacts, version_id)
    return VersionSamplesPublic(
        version_id=samples.version_id,
        parent_id=samples.parent_id,
        prompts=[
            VersionSamplePublic(
                prompt=row.prompt,
                seed=row.seed,
                parent_url=_sample_url(version_id, row.parent),
                candidate_url=_sample_url(version_id, row.candidate),
            )
            for row in samples.rows
        ],
        grid_url=_sample_url(version_id, samples.grid) if samples.grid else None,
        created_at=samples.created_at,
    )


@router.get(
    "/{version_id}/samples/{filename}",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}}, "description": "The PNG."},
        304: {"description": "Not modified (If-None-Match)."},
        404: {
            "model": Message,
            "description": "Unknown version, or no such sample (names: parent-NN.png, "
            "candidate-NN.png, grid.png).",
        },
    },
)
def get_version_sample_file(
    version_id: IdPath,
    filename: Annotated[
        str, Path(description="parent-NN.png, candidate-NN.png or grid.png; else 404")
    ],
    request: Request,
    session: SessionDep,
    state: StateDep,
    admin: AdminUser,
) -> Response:
    """One validation image of this version (PNG)."""
    data = version_service.sample_bytes(session, state.artifacts, version_id, filename)
    etag = f'"{hashlib.sha256(data).hexdigest()}"'
    headers = {"ETag": etag, "Cache-Control": SAMPLES_CACHE_CONTROL}
    if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
    return Response(content=data, media_type="image/png", headers=headers)
