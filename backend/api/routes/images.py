from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response, status

from backend.api.deps import IdPath, SessionDep, StateDep, get_current_user, oauth2_scheme
from backend.services import images as image_service
from backend.storage import UnsafePath

router = APIRouter(prefix="/images", tags=["annotation"])

CACHE_CONTROL = "private, max-age=31536000, immutable"


@router.get(
    "/{image_id}",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}},
        304: {"description": "Not modified (If-None-Match)."},
    },
)
def get_image(
    image_id: IdPath,
    request: Request,
    session: SessionDep,
    state: StateDep,
    token: Annotated[str | None, Depends(oauth2_scheme)],
    sig: Annotated[str | None, Query(max_length=64, pattern="^[0-9a-f]+$")] = None,
) -> Response:
    """The image bytes. Authorised by the signed URL that ``/pairs/next`` returns, or by a
    bearer token. Content never changes: ``ETag`` is its sha256, cached as immutable.

    The API serves the bytes itself from the store, local disk or object storage (kept in an
    in-process cache there; docs/scaling.md says why this is not a redirect to the bucket)."""
    if sig is not None:
        if not state.signer.verify(image_id, sig):
            raise HTTPException(status.HTTP_403_FORBIDDEN, detail="invalid image signature")
    else:
        get_current_user(state, session, token)
    image = image_service.get_image(session, image_id)
    etag = f'"{image.sha256}"'
    headers = {"ETag": etag, "Cache-Control": CACHE_CONTROL}
    if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
    try:
        data = state.store.read(image.storage_path)
    except (UnsafePath, FileNotFoundError, IsADirectoryError):
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="image file not found") from None
    return Response(content=data, media_type=image.media_type, headers=headers)
