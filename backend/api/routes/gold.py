"""Gold pairs for any model (admins): upload one, or mark an existing pair gold
(:mod:`backend.services.gold`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile, status

from backend.api.deps import AdminUser, IdPath, SessionDep, StateDep
from backend.models import GoldAnswer
from backend.schemas import GoldMark, GoldPairPublic
from backend.services import gold as gold_service

router = APIRouter(prefix="/pairs", tags=["gold"])


@router.post("/gold", response_model=GoldPairPublic, status_code=status.HTTP_201_CREATED)
def upload_gold_pair(
    prompt: Annotated[str, Form(description="The prompt both images answer.")],
    answer: Annotated[GoldAnswer, Form(description="Which image is right: a or b.")],
    image_a: Annotated[UploadFile, File(description="Image a (PNG, JPEG or WebP).")],
    image_b: Annotated[UploadFile, File(description="Image b (PNG, JPEG or WebP).")],
    session: SessionDep,
    state: StateDep,
    admin: AdminUser,
) -> GoldPairPublic:
    """A new gold pair, served as a control at ``PREFLOOP_GOLD_FRACTION``; 422 naming a bad
    prompt or image, and nothing written."""
    pair = gold_service.create_gold_pair(
        session,
        state.store,
        prompt=prompt,
        image_a=image_a.file.read(),
        image_b=image_b.file.read(),
        answer=answer,
    )
    session.commit()
    return GoldPairPublic.model_validate(pair)


@router.post("/{pair_id}/gold", response_model=GoldPairPublic)
def mark_gold(
    pair_id: IdPath, body: GoldMark, session: SessionDep, admin: AdminUser
) -> GoldPairPublic:
    """Make an existing pair gold with this answer: its votes stop training and count toward
    the voters' gold accuracy. 404 unknown pair, 409 an A/B pair."""
    pair = gold_service.mark_gold(session, pair_id, body.answer)
    session.commit()
    return GoldPairPublic.model_validate(pair)
