"""Gold (control) pairs for any model: uploaded by an admin, or an existing pair marked gold.

The built-in model keeps its automatic gold pairs (``worker.pair_pool``: the judge knows the
answer). For any other model an admin provides the answer:

- :func:`create_gold_pair`: a prompt, two images and which one is right. The images belong to
  the retired version ``external:gold`` (they are nobody's samples); the prompt is reused when
  it exists, else stored inactive (no worker samples it). Everything is validated before the
  first write; the image files are removed again if the transaction does not commit.
- :func:`mark_gold`: an existing within- or cross-version pair becomes a gold pair with the
  given answer (or a gold pair gets a new answer). Its votes stop being training votes (gold
  pairs never train) and start counting toward each voter's gold accuracy. A/B pairs cannot
  be gold (409).

Gold pairs are served at ``PREFLOOP_GOLD_FRACTION`` like the automatic ones.
"""

from __future__ import annotations

import random

from sqlalchemy import select
from sqlalchemy.orm import Session

from backend.models import GoldAnswer, Pair, PairKind, Prompt
from backend.services import images as image_service
from backend.services import pairs as pair_service
from backend.services import versions
from backend.services.errors import Conflict, Invalid, NotFound
from backend.services.prompts import MAX_PROMPT_CHARS
from backend.storage import ImageStore, sniff_media_type
from backend.text_input import TextProblem, check_text

#: The version the uploaded gold images belong to.
GOLD_MODEL = "gold"


def _size(data: bytes) -> tuple[int, int]:
    import io

    from PIL import Image as PILImage

    try:
        with PILImage.open(io.BytesIO(data)) as im:
            im.verify()
            return int(im.width), int(im.height)
    except Exception:  # noqa: BLE001 - reported as a 422 naming the image
        return 0, 0


def create_gold_pair(
    session: Session,
    store: ImageStore,
    *,
    prompt: str,
    image_a: bytes,
    image_b: bytes,
    answer: GoldAnswer,
    rng: random.Random | None = None,
) -> Pair:
    """A new active gold pair (flushed, not committed); 422 naming the bad field."""
    text = " ".join(prompt.split())
    if not text:
        raise Invalid("prompt: empty")
    try:
        check_text(text, "prompt", max_length=MAX_PROMPT_CHARS)
    except TextProblem as exc:
        raise Invalid(str(exc)) from None
    sizes = []
    for name, blob in (("image_a", image_a), ("image_b", image_b)):
        w, h = _size(blob) if sniff_media_type(blob) is not None else (0, 0)
        if not w or not h:
            raise Invalid(f"{name}: not a readable PNG, JPEG or WebP image")
        sizes.append((w, h))
    prompt_id = session.scalar(select(Prompt.id).where(Prompt.text == text))
    if prompt_id is None:
        p = Prompt(text=text, source="gold", active=False)
        session.add(p)
        session.flush()
        prompt_id = p.id
    version_id = versions.get_or_create_external(session, GOLD_MODEL).id
    imgs = [
        image_service.store_image(
            session,
            store,
            version_id=version_id,
            prompt_id=prompt_id,
            data=blob,
            seed=0,
            cfg=0.0,
            steps=0,
            sampler="external",
            width=w,
            height=h,
        )
        for blob, (w, h) in zip((image_a, image_b), sizes, strict=True)
    ]
    return pair_service.create_pair(
        session,
        kind=PairKind.gold,
        image_a_id=imgs[0].id,
        image_b_id=imgs[1].id,
        gold_answer=answer,
        source="gold",
        rng=rng,
    )


def mark_gold(session: Session, pair_id: int, answer: GoldAnswer) -> Pair:
    """Make pair ``pair_id`` gold with ``answer`` (404 unknown, 409 an A/B pair)."""
    pair = session.scalars(select(Pair).where(Pair.id == pair_id).with_for_update()).first()
    if pair is None:
        raise NotFound(f"pair {pair_id} not found")
    if pair.kind == PairKind.ab:
        raise Conflict(f"pair {pair_id} is an A/B pair; it cannot be gold")
    pair.kind = PairKind.gold
    pair.gold_answer = answer
    session.flush()
    return pair
