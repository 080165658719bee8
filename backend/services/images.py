"""Generated (or imported) images: stored as objects (:mod:`backend.storage`: local disk or
S3-compatible), described by rows."""

from __future__ import annotations

from sqlalchemy.orm import Session

from backend import staging
from backend.models import Image
from backend.services.errors import Invalid, NotFound
from backend.storage import ImageStore, sniff_media_type


def store_image(
    session: Session,
    store: ImageStore,
    *,
    version_id: int,
    prompt_id: int,
    data: bytes,
    seed: int,
    cfg: float,
    steps: int,
    sampler: str,
    width: int,
    height: int,
) -> Image:
    """Write the bytes (content-addressed, atomic) and add the row (flushed, not committed).
    A file this call creates is deleted again if the session's transaction does not commit
    (:mod:`backend.staging`)."""
    media_type = sniff_media_type(data)
    if media_type is None:
        raise Invalid("image bytes are not PNG, JPEG or WebP")
    rel, digest = store.save(
        data, media_type, on_create=lambda st, rel: staging.track_new_file(session, st, rel)
    )
    image = Image(
        version_id=version_id,
        prompt_id=prompt_id,
        seed=seed,
        cfg=cfg,
        steps=steps,
        sampler=sampler,
        width=width,
        height=height,
        sha256=digest,
        storage_path=rel,
        media_type=media_type,
    )
    session.add(image)
    session.flush()
    return image


def get_image(session: Session, image_id: int) -> Image:
    image = session.get(Image, image_id)
    if image is None:
        raise NotFound(f"image {image_id} not found")
    return image
