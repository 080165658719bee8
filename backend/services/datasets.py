"""Dataset export (Pick-a-Pic schema / JSONL) and import (Pick-a-Pic parquet).

The file formats live in :mod:`backend.dataset_io`; this module maps rows to records and
records to rows.

Export: one record per left/right/tie vote on a within- or cross-version pair by an active
(not banned) annotator, in vote order. ``image_0`` is the pair's image *a* (the stored order,
not the side the annotator saw); ties are ``label_0 = label_1 = 0.5``. Skip and both-bad votes
and gold (control) pairs are left out.

Import: each row becomes a prompt (reused when the text exists), two images, a pair
(``source="import"``, within-version when ``model_0 == model_1``, else cross-version), an
assignment and a vote, by a login-less annotator ``pickapic:<user_id>``; each outside model
becomes a retired version ``external:<name>``. All in the caller's transaction, written as
the file is read row group by row group (:func:`import_pairs`); a bad row anywhere means the
caller rolls the whole import back, its image files included.

Round trip: an import keeps each vote's ``ranking_id`` and ``created_at`` and each image's
uid, and an export of an imported row gives back the original ``user_id`` (from the account
name), ``ranking_id``, ``created_at``, model names and image uids. Rows the server collected
export our own ids (vote id, user id, image id) and version names.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, aliased

from backend.models import (
    Choice,
    Image,
    ModelVersion,
    Pair,
    PairAssignment,
    PairKind,
    Prompt,
    User,
    UserRole,
    UserStatus,
    Vote,
)
from backend.security import UNUSABLE_PASSWORD
from backend.services import images as image_service
from backend.services import versions
from backend.services.common import as_utc
from backend.services.errors import Invalid
from backend.services.prompts import MAX_PROMPT_CHARS
from backend.storage import ImageStore, sniff_media_type
from backend.text_input import TextProblem, check_text

EXPORT_BATCH = 200
#: An outside model's name becomes the version ``external:<name>`` (255 characters).
EXTERNAL_PREFIX = "external:"
MAX_MODEL_NAME_CHARS = 255 - len(EXTERNAL_PREFIX)
#: An imported annotator is the account ``pickapic:<their user_id>``.
IMPORTED_USER_PREFIX = "pickapic:"


def _model_name(version_name: str) -> str:
    """An outside model's own name (``external:sdxl`` -> ``sdxl``); our versions' as they are."""
    return version_name.removeprefix(EXTERNAL_PREFIX)


def _exported_user_id(username: str, user_id: int) -> int:
    """An imported annotator's id in their dataset (``pickapic:123`` -> 123), else ours."""
    rest = username.removeprefix(IMPORTED_USER_PREFIX)
    if rest != username and rest.isascii() and rest.isdigit():
        return int(rest)
    return user_id


def iter_export_records(session: Session, store: ImageStore) -> Iterator[Any]:
    from backend.dataset_io import ExportRecord

    ia, ib = aliased(Image), aliased(Image)
    va, vb = aliased(ModelVersion), aliased(ModelVersion)
    stmt = (
        select(
            Vote.id,
            Vote.user_id,
            Vote.choice,
            Vote.winner_image_id,
            Vote.created_at,
            Prompt.text,
            ia.id,
            ia.storage_path,
            ib.id,
            ib.storage_path,
            va.name,
            vb.name,
            User.username,
            Vote.external_ranking_id,
            ia.external_uid,
            ib.external_uid,
        )
        .select_from(Vote)
        .join(Pair, Pair.id == Vote.pair_id)
        .join(Prompt, Prompt.id == Pair.prompt_id)
        .join(ia, ia.id == Pair.image_a_id)
        .join(ib, ib.id == Pair.image_b_id)
        .join(va, va.id == ia.version_id)
        .join(vb, vb.id == ib.version_id)
        .join(User, User.id == Vote.user_id)
        .where(
            Pair.kind.in_([PairKind.within_version, PairKind.cross_version]),
            Vote.choice.in_([Choice.left, Choice.right, Choice.tie]),
            User.status == UserStatus.active,
        )
        .order_by(Vote.id)
    )
    last_id = 0
    while True:
        rows = session.execute(stmt.where(Vote.id > last_id).limit(EXPORT_BATCH)).all()
        if not rows:
            return
        for (
            vote_id,
            user_id,
            choice,
            winner,
            created_at,
            caption,
            a_id,
            a_path,
            b_id,
            b_path,
            model_0,
            model_1,
            username,
            ranking_id,
            uid_0,
            uid_1,
        ) in rows:
            if choice == Choice.tie:
                label_0 = label_1 = 0.5
            else:
                label_0, label_1 = (1.0, 0.0) if winner == a_id else (0.0, 1.0)
            yield ExportRecord(
                caption=caption,
                image_0=store.read(a_path),
                image_1=store.read(b_path),
                image_0_uid=uid_0 or str(a_id),
                image_1_uid=uid_1 or str(b_id),
                label_0=label_0,
                label_1=label_1,
                model_0=_model_name(model_0),
                model_1=_model_name(model_1),
                user_id=_exported_user_id(username, user_id),
                ranking_id=ranking_id if ranking_id is not None else vote_id,
                created_at=as_utc(created_at) or created_at.replace(tzinfo=UTC),
            )
        last_id = rows[-1][0]


@dataclass(frozen=True)
class ImportResult:
    pairs: int
    votes: int
    prompts_created: int
    annotators_created: int
    versions_created: int
    #: Rows of the file read (labelled or not; fewer than the file's when ``max_rows`` ends
    #: the import early), of them without a label (``has_label`` false, skipped), and the
    #: file's row groups.
    rows: int = 0
    rows_unlabelled: int = 0
    row_groups: int = 0


def _image_size(data: bytes) -> tuple[int, int]:
    try:
        import io

        from PIL import Image as PILImage

        with PILImage.open(io.BytesIO(data)) as im:
            return int(im.width), int(im.height)
    except Exception:  # noqa: BLE001 - unreadable bytes are reported by the caller
        return 0, 0


def _checked_caption(i: int, row: Any) -> str:
    """File row ``i``'s caption, whitespace-normalised; :class:`Invalid` naming the row and field
    when the caption, a model name or an image cannot be stored."""
    caption = " ".join(str(row.caption).split())[:MAX_PROMPT_CHARS]
    if not caption:
        raise Invalid(f"row {i}: empty caption")
    try:
        check_text(caption, "caption")
        for name in ("model_0", "model_1"):
            check_text(str(getattr(row, name) or ""), name, max_length=MAX_MODEL_NAME_CHARS)
    except TextProblem as exc:
        raise Invalid(f"row {i}: {exc}") from None
    for name, blob in (("image_0", row.image_0), ("image_1", row.image_1)):
        if sniff_media_type(blob) is None:
            raise Invalid(f"row {i}: {name} is not a PNG, JPEG or WebP image")
    return caption


def import_pairs(
    session: Session,
    store: ImageStore,
    source: Any,
    *,
    max_rows: int,
    rng: random.Random | None = None,
    progress: Any = None,
) -> ImportResult:
    """Import a Pick-a-Pic parquet file (``source``: its bytes, a path, or a seekable binary
    file object, read in place) into the caller's transaction, row group by row group.

    Each row is validated, then written (flushed); at most one batch of its images is held in
    memory. The first bad row raises :class:`Invalid` (naming the 0-based file row and the
    column) after earlier rows were flushed: the caller must roll back, which also deletes the
    image files the import created (:mod:`backend.staging`), so a file writes all its rows or
    none. ``progress(rows_read, rows_in_file)`` is called after each batch (default: an
    :class:`backend.dataset_io.ImportProgress`, which logs).
    """
    from backend.dataset_io import DatasetFormatError, ImportProgress, open_pickapic_parquet

    rng = rng or random.Random()
    try:
        reader = open_pickapic_parquet(source)
    except DatasetFormatError as exc:
        raise Invalid(f"invalid Pick-a-Pic parquet: {exc}") from None
    own_progress = progress is None
    if own_progress:
        progress = ImportProgress(
            f"import of {reader.num_rows} rows in {reader.num_row_groups} row groups"
        )
    try:
        with reader:
            result = _write_pairs(
                session, store, reader.pairs(max_rows=max_rows, progress=progress), rng
            )
    except DatasetFormatError as exc:
        raise Invalid(f"invalid Pick-a-Pic parquet: {exc}") from None
    finally:
        if own_progress:
            progress.close()
    if result.pairs == 0:
        raise Invalid("the file holds no pair")
    return dataclasses.replace(
        result,
        rows=reader.rows_read,
        rows_unlabelled=reader.rows_unlabelled,
        row_groups=reader.num_row_groups,
    )


def _write_pairs(
    session: Session, store: ImageStore, pairs: Iterator[Any], rng: random.Random
) -> ImportResult:
    prompts: dict[str, int] = {}
    users: dict[int, int] = {}
    model_versions: dict[str, int] = {}
    created = {"prompts": 0, "users": 0, "versions": 0}
    n_votes = 0
    n_pairs = 0
    for row in pairs:
        caption = _checked_caption(row.row, row)
        n_pairs += 1
        prompt_id = prompts.get(caption)
        if prompt_id is None:
            prompt_id = session.scalar(select(Prompt.id).where(Prompt.text == caption))
            if prompt_id is None:
                p = Prompt(text=caption, source="import", active=False)
                session.add(p)
                session.flush()
                prompt_id = p.id
                created["prompts"] += 1
            prompts[caption] = prompt_id
        version_ids = []
        for model in (row.model_0, row.model_1):
            model = str(model or "unknown")
            if model not in model_versions:
                before = session.scalar(
                    select(ModelVersion.id).where(ModelVersion.name == f"external:{model}"[:255])
                )
                model_versions[model] = versions.get_or_create_external(session, model).id
                created["versions"] += before is None
            version_ids.append(model_versions[model])
        user_key = int(row.user_id) if row.user_id is not None else -1
        user_id = users.get(user_key)
        if user_id is None:
            username = f"{IMPORTED_USER_PREFIX}{user_key if user_key >= 0 else 'anonymous'}"[:64]
            user_id = session.scalar(select(User.id).where(User.username == username))
            if user_id is None:
                u = User(
                    username=username,
                    password_hash=UNUSABLE_PASSWORD,
                    role=UserRole.annotator,
                    status=UserStatus.active,
                )
                session.add(u)
                session.flush()
                user_id = u.id
                created["users"] += 1
            users[user_key] = user_id
        imgs = []
        for blob, version_id, uid in (
            (row.image_0, version_ids[0], row.image_0_uid),
            (row.image_1, version_ids[1], row.image_1_uid),
        ):
            w, h = _image_size(blob)
            imgs.append(
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
            )
            imgs[-1].external_uid = uid
        kind = (
            PairKind.within_version if version_ids[0] == version_ids[1] else PairKind.cross_version
        )
        pair = Pair(
            kind=kind,
            prompt_id=prompt_id,
            image_a_id=imgs[0].id,
            image_b_id=imgs[1].id,
            source="import",
            active=False,
            rand_key=rng.random(),
        )
        session.add(pair)
        session.flush()
        session.add(
            PairAssignment(
                user_id=user_id,
                pair_id=pair.id,
                left_image_id=imgs[0].id,
                right_image_id=imgs[1].id,
            )
        )
        l0, l1 = float(row.label_0), float(row.label_1)
        if l0 == l1 == 0.0:
            choice, winner = Choice.both_bad, None
        elif l0 == l1:
            choice, winner = Choice.tie, None
        elif l0 > l1:
            choice, winner = Choice.left, imgs[0].id
        else:
            choice, winner = Choice.right, imgs[1].id
        session.add(
            Vote(
                user_id=user_id,
                pair_id=pair.id,
                choice=choice,
                winner_image_id=winner,
                external_ranking_id=row.ranking_id,
                **({"created_at": row.created_at} if row.created_at is not None else {}),
            )
        )
        n_votes += 1
    session.flush()
    return ImportResult(
        pairs=n_pairs,
        votes=n_votes,
        prompts_created=created["prompts"],
        annotators_created=created["users"],
        versions_created=created["versions"],
    )
