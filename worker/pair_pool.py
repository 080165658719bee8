"""The pool of ready pairs: kept filled ahead of demand, from the serving version.

:func:`refill_pool` (the ``pairs.generate`` task, which beat sends every 30 s) tops the pool
up to ``settings.pair_pool_target`` *ready* pairs, i.e. active pairs that fewer than
``settings.pair_overlap`` annotators have voted on. Each call:

1. retires what should no longer be served: pairs with enough votes, within-version pairs of
   versions that no longer serve, and cross-version pairs that do not involve the serving
   version;
2. makes sure there is a serving version (the base model's, on a fresh database) and prompts
   (the active prompts; on an empty database with the built-in model, the world's
   training-split prompts);
3. generates the missing pairs in batches, each batch in one transaction:

   - **within-version** pairs (they feed training): two images of one prompt from the serving
     version, each with its own random seed and a random guidance scale drawn from a small
     grid around the model's default, both logged on the image row (as Pick-a-Pic does).
     ``settings.pair_active_share`` of them are chosen actively (``docs/active.md``): the
     batch samples ``settings.pair_active_candidates`` candidate pairs for each and keeps the
     ones whose two images differ most (:mod:`backend.active`); the rest are drawn uniformly;
   - **cross-version** pairs (they feed the leaderboard, with the A/B pairs below): the
     serving version and its parent on one prompt, with the same seed and guidance scale, so
     only the model differs; :data:`CROSS_VERSION_FRACTION` of a batch when the serving
     version has a parent;
   - **gold** pairs (controls, about ``settings.gold_fraction`` of a batch; built-in world
     only): a true render of the prompt against a render of a scene that differs in one
     attribute, with ``gold_answer`` naming the true one. Their images belong to a retired
     ``external:`` version standing for the world's renderer;
   - **A/B** pairs (kind ``ab``, ``docs/publishing.md``): for each open A/B test, the tested
     version (a candidate, or the published version under the live monitor) against its
     parent on one prompt, with one fresh seed and guidance scale for both, sides in random
     order. Prompts come half from a fixed evaluation set (:func:`ab_eval_prompt_ids`), half
     from the active prompts. An A/B pair is served to one annotator only
     (``backend.services.pairs``) and retired once served, so each test keeps enough of the
     ready pairs (:func:`ab_pair_fraction`) for about its share of the *served* pairs
     (``settings.ab_share`` split between open gates, ``settings.ab_live_share`` for the live
     test). A candidate's images appear in its A/B pairs and nowhere else: within-version
     pairs come from the serving version only.

Image files are written first (content-addressed, temporary name then rename, by
:class:`backend.storage.ImageStore`), then the batch's image and pair rows are inserted and
committed together: no row ever points at a missing file. A crash between the two leaves only
unreferenced files, which the next identical image would reuse.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from backend import active
from backend.models import (
    ABPhase,
    ABState,
    ABTest,
    GoldAnswer,
    Image,
    ModelVersion,
    Pair,
    PairAssignment,
    PairKind,
    Prompt,
    VersionStatus,
    Vote,
)
from backend.services import images as image_service
from backend.services import pairs as pair_service
from backend.services import versions as version_service
from backend.services.common import dialect_insert
from backend.services.pool import count_ready
from backend.settings import Settings
from backend.storage import ImageStore, artifact_store, image_store
from worker import model_registry
from worker.alignment.backbone import Backbone
from worker.shapes import world
from worker.shapes.world import Scene

log = logging.getLogger(__name__)

SessionFactory = Callable[[], Session]

#: Pairs generated (and committed) per transaction.
BATCH_PAIRS = 32
#: Share of non-gold pairs that compare the serving version with its parent, when it has one.
CROSS_VERSION_FRACTION = 0.25
#: Guidance scales are drawn per image from this grid, relative to the model's default scale.
CFG_GRID = (0.7, 0.85, 1.0, 1.15, 1.3)
#: The stand-in version of gold images: the built-in world's renderer, not a model.
RENDERER_NAME = "shapes-world-renderer"
BUILTIN_PROMPT_SOURCE = "builtin:shapes"
#: Source of the built-in world's held-out prompts stored (inactive) for A/B pairs.
AB_EVAL_PROMPT_SOURCE = "builtin:shapes:ab-eval"
#: Size of the fixed evaluation set of A/B prompts, and the share of A/B pairs drawn from it
#: (the rest are fresh: the active prompts annotators see in the other pairs).
AB_EVAL_PROMPTS = 64
AB_EVAL_FRACTION = 0.5
AB_EVAL_SEED = 4321
GOLD_ATTRIBUTES = ("colour", "shape", "position", "size", "background")


@dataclass
class _PendingImage:
    prompt_id: int
    version_id: int
    png: bytes
    sha256: str
    seed: int
    cfg: float
    steps: int
    sampler: str
    width: int
    height: int
    rel_path: str = ""
    #: A small float copy of the pixels (:func:`backend.active.thumbnail`), for active choice.
    thumb: np.ndarray | None = field(default=None, repr=False)


@dataclass
class _PendingPair:
    kind: PairKind
    a: _PendingImage
    b: _PendingImage
    gold_answer: GoldAnswer | None = None
    ab_test_id: int | None = None


@dataclass
class ABPlan:
    """One open A/B test the pool serves: ``version_id`` against ``parent_id``, ``share`` of
    the served pairs, ``ready`` of its pairs ready now, ``todo`` to make in this refill."""

    test_id: int
    version_id: int
    parent_id: int
    phase: ABPhase
    share: float
    ready: int = 0
    todo: int = 0


@dataclass
class _Batch:
    pairs: list[_PendingPair] = field(default_factory=list)


# ---------------------------------------------------------------------------- bookkeeping
def retire_done_pairs(session: Session, *, overlap: int, serving_id: int | None) -> int:
    """Deactivate pairs that should no longer be served; returns how many."""
    voted = (
        select(Vote.pair_id)
        .group_by(Vote.pair_id)
        .having(func.count() >= overlap)
        .scalar_subquery()
    )
    conditions = [Pair.id.in_(voted)]
    if serving_id is not None:
        img_a, img_b = aliased(Image), aliased(Image)
        stale_within = (
            select(Pair.id)
            .join(img_a, img_a.id == Pair.image_a_id)
            .where(Pair.kind == PairKind.within_version, img_a.version_id != serving_id)
            .scalar_subquery()
        )
        stale_cross = (
            select(Pair.id)
            .join(img_a, img_a.id == Pair.image_a_id)
            .join(img_b, img_b.id == Pair.image_b_id)
            .where(
                Pair.kind == PairKind.cross_version,
                img_a.version_id != serving_id,
                img_b.version_id != serving_id,
            )
            .scalar_subquery()
        )
        conditions += [Pair.id.in_(stale_within), Pair.id.in_(stale_cross)]
    # A/B pairs: served once (to one annotator), and only while their test is open.
    served = select(PairAssignment.pair_id).where(PairAssignment.pair_id == Pair.id)
    open_tests = select(ABTest.id).where(ABTest.state == ABState.open).scalar_subquery()
    conditions += [
        and_(Pair.kind == PairKind.ab, served.exists()),
        and_(
            Pair.kind == PairKind.ab,
            or_(Pair.ab_test_id.is_(None), Pair.ab_test_id.not_in(open_tests)),
        ),
    ]
    result = session.execute(
        update(Pair)
        .where(Pair.active.is_(True), Pair.source == "pool", or_(*conditions))
        .values(active=False)
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


#: The A/B shares together never take more than this of the served pairs.
MAX_AB_SHARE = 0.95


def ab_pair_fraction(share: float, overlap: int) -> float:
    """The fraction of the pool's ready pairs that must be A/B pairs for about ``share`` of the
    *served* pairs to be: an A/B pair is served once, any other pair up to ``overlap`` times
    (to different annotators), so ``f / (f + overlap (1 - f)) = share``, i.e.
    ``f = share * overlap / (1 - share + share * overlap)``."""
    s = min(max(share, 0.0), MAX_AB_SHARE)
    if s == 0.0:
        return 0.0
    return s * overlap / (1.0 - s + s * overlap)


def ab_plans(session: Session, serving_id: int, settings: Settings) -> list[ABPlan]:
    """The open A/B tests the pool serves, with their shares and ready pairs: each open gate
    of a candidate (``ab_share`` split between them), and the serving version's open live
    test (``ab_live_share``). Tests of versions that changed status are left to the
    ``ab.check`` task, which closes them."""
    rows = session.execute(
        select(ABTest.id, ABTest.version_id, ABTest.parent_id, ABTest.phase, ModelVersion.status)
        .join(ModelVersion, ModelVersion.id == ABTest.version_id)
        .where(ABTest.state == ABState.open)
        .order_by(ABTest.id)
    ).all()
    gates = [
        r
        for r in rows
        if ABPhase(r[3]) == ABPhase.gate and VersionStatus(r[4]) == VersionStatus.candidate
    ]
    lives = [r for r in rows if ABPhase(r[3]) == ABPhase.live and r[1] == serving_id]
    plans = [
        ABPlan(r[0], r[1], r[2], ABPhase.gate, settings.ab_share / len(gates)) for r in gates
    ] + [ABPlan(r[0], r[1], r[2], ABPhase.live, settings.ab_live_share) for r in lives[:1]]
    plans = [p for p in plans if p.share > 0]
    if plans:
        served = select(PairAssignment.pair_id).where(PairAssignment.pair_id == Pair.id)
        ready = dict(
            session.execute(
                select(Pair.ab_test_id, func.count())
                .where(
                    Pair.active.is_(True),
                    Pair.kind == PairKind.ab,
                    Pair.ab_test_id.in_([p.test_id for p in plans]),
                    ~served.exists(),
                )
                .group_by(Pair.ab_test_id)
            ).all()
        )
        for p in plans:
            p.ready = int(ready.get(p.test_id, 0))
    return plans


def ab_eval_prompt_ids(session_factory: SessionFactory, base_model: str) -> list[int]:
    """The fixed evaluation set of A/B prompts. Built-in model: :data:`AB_EVAL_PROMPTS` of the
    world's held-out prompts (never used for training pairs), stored inactive so that no other
    pair uses them; otherwise the first :data:`AB_EVAL_PROMPTS` active prompts by id."""
    if not model_registry.is_builtin(base_model):
        with session_factory() as session:
            ids = list(
                session.scalars(
                    select(Prompt.id)
                    .where(Prompt.active.is_(True))
                    .order_by(Prompt.id)
                    .limit(AB_EVAL_PROMPTS)
                )
            )
            session.rollback()
        return ids
    _, held_out = world.split_prompts()
    order = random.Random(AB_EVAL_SEED).sample(range(len(held_out)), len(held_out))
    texts = [held_out[i] for i in order[:AB_EVAL_PROMPTS]]
    with session_factory() as session:
        ids = list(session.scalars(select(Prompt.id).where(Prompt.text.in_(texts))))
        if len(ids) < len(texts):
            session.execute(
                dialect_insert(session, Prompt.__table__)
                .values(
                    [{"text": t, "source": AB_EVAL_PROMPT_SOURCE, "active": False} for t in texts]
                )
                .on_conflict_do_nothing()
            )
            session.commit()
            ids = list(session.scalars(select(Prompt.id).where(Prompt.text.in_(texts))))
        session.rollback()
    return sorted(ids)


def ensure_serving_version(session_factory: SessionFactory, base_model: str) -> int:
    """The serving version's id; on a fresh database, the base model's version, published."""
    for _ in range(3):
        with session_factory() as session:
            serving = version_service.serving_version(session)
            if serving is not None:
                return serving.id
            try:
                version = version_service.ensure_base_version(session, base_model)
                session.commit()
                return version.id
            except IntegrityError:  # another process created it first: read theirs
                session.rollback()
    raise RuntimeError("could not find or create the serving version")


def ensure_prompts(session_factory: SessionFactory, base_model: str) -> int:
    """Seed the world's training prompts when the database has none and the model is built-in.

    Returns the number of active prompts.
    """
    with session_factory() as session:
        active = session.scalar(
            select(func.count()).select_from(Prompt).where(Prompt.active.is_(True))
        )
        if active or not model_registry.is_builtin(base_model):
            return int(active or 0)
        train, _ = world.split_prompts()
        stmt = (
            dialect_insert(session, Prompt.__table__)
            .values([{"text": t, "source": BUILTIN_PROMPT_SOURCE, "active": True} for t in train])
            .on_conflict_do_nothing()
        )
        session.execute(stmt)
        session.commit()
        log.info("seeded %d built-in prompts", len(train))
        return int(
            session.scalar(select(func.count()).select_from(Prompt).where(Prompt.active.is_(True)))
            or 0
        )


def renderer_version_id(session_factory: SessionFactory) -> int:
    for _ in range(3):
        with session_factory() as session:
            try:
                version = version_service.get_or_create_external(session, RENDERER_NAME)
                session.commit()
                return version.id
            except IntegrityError:
                session.rollback()
    raise RuntimeError("could not create the renderer's version")


# ---------------------------------------------------------------------------- generation
def _generate(
    backbone: Backbone,
    version_id: int,
    jobs: list[tuple[int, str, int, float]],
) -> list[_PendingImage]:
    """Sample one image per ``(prompt_id, prompt, seed, cfg)``, batching equal guidance scales."""
    from worker.alignment.sampling import sample

    out: dict[int, _PendingImage] = {}
    by_cfg: dict[float, list[int]] = {}
    for i, job in enumerate(jobs):
        by_cfg.setdefault(job[3], []).append(i)
    for cfg, idx in by_cfg.items():
        images = sample(
            backbone,
            [jobs[i][1] for i in idx],
            [jobs[i][2] for i in idx],
            guidance_scale=cfg,
        )
        for i, g in zip(idx, images, strict=True):
            out[i] = _PendingImage(
                prompt_id=jobs[i][0],
                version_id=version_id,
                png=g.to_png_bytes(),
                sha256=g.sha256,
                seed=g.seed,
                cfg=g.guidance_scale,
                steps=g.num_inference_steps,
                sampler=g.sampler,
                width=g.width,
                height=g.height,
                thumb=active.thumbnail(g.image),
            )
    return [out[i] for i in range(len(jobs))]


def _mismatched_scene(scene: Scene, rng: random.Random) -> Scene:
    """A scene that differs from ``scene`` in one attribute (never the same prompt)."""
    attribute = rng.choice(GOLD_ATTRIBUTES)
    free_colours = [c for c in world.COLOURS if c not in (scene.colour, scene.background)]
    options = {
        "colour": free_colours,
        "background": free_colours,
        "shape": [s for s in world.SHAPES if s != scene.shape],
        "position": [p for p in world.POSITIONS if p != scene.position],
        "size": [s for s in world.SIZES if s != scene.size],
    }[attribute]
    return dataclasses.replace(scene, **{attribute: rng.choice(options)})


def _gold_pair(
    prompt_id: int, prompt: str, renderer_id: int, resolution: int, rng: random.Random
) -> _PendingPair | None:
    from worker.alignment.sampling import GeneratedImage

    try:
        scene = world.parse_prompt(prompt)
    except ValueError:
        return None  # an imported prompt outside the world: no true render exists
    wrong = _mismatched_scene(scene, rng)
    seed_true, seed_wrong = rng.randrange(2**31), rng.randrange(2**31)

    def rendered(s: Scene, seed: int) -> _PendingImage:
        arr = world.render(s, size=resolution, rng=np.random.default_rng(seed))
        g = GeneratedImage.from_array(
            arr,
            prompt=prompt,
            seed=seed,
            guidance_scale=0.0,
            num_inference_steps=0,
            sampler="render",
            eta=0.0,
            width=resolution,
            height=resolution,
            model_name=RENDERER_NAME,
        )
        return _PendingImage(
            prompt_id=prompt_id,
            version_id=renderer_id,
            png=g.to_png_bytes(),
            sha256=g.sha256,
            seed=seed,
            cfg=0.0,
            steps=0,
            sampler="render",
            width=resolution,
            height=resolution,
        )

    true_img, wrong_img = rendered(scene, seed_true), rendered(wrong, seed_wrong)
    if rng.random() < 0.5:
        return _PendingPair(PairKind.gold, true_img, wrong_img, GoldAnswer.a)
    return _PendingPair(PairKind.gold, wrong_img, true_img, GoldAnswer.b)


def _plan(
    n: int, gold_fraction: float, has_parent: bool, gold_possible: bool, rng: random.Random
) -> tuple[int, int, int]:
    """How many (within, cross, gold) pairs make ``n``; rounding is randomised so that small
    batches still honour the fractions on average."""

    def share(total: int, fraction: float) -> int:
        exact = total * fraction
        whole = int(exact)
        return whole + (1 if rng.random() < exact - whole else 0)

    gold = share(n, gold_fraction) if gold_possible else 0
    rest = n - gold
    cross = share(rest, CROSS_VERSION_FRACTION) if has_parent else 0
    return rest - cross, cross, gold


def _ab_pairs(
    counts: list[tuple[ABPlan, int]],
    *,
    models: dict[int, Backbone],
    fresh_prompts: list[tuple[int, str]],
    eval_prompts: list[tuple[int, str]],
    grid: list[float],
    rng: random.Random,
) -> list[_PendingPair]:
    """A/B pairs: per test, its version and its parent on one prompt (half from the fixed
    evaluation set, half fresh), one fresh seed and guidance scale for both, sides random."""
    out: list[_PendingPair] = []
    for plan, n in counts:
        if n <= 0:
            continue
        jobs = []
        for _ in range(n):
            source = eval_prompts if eval_prompts and rng.random() < AB_EVAL_FRACTION else None
            pid, text = rng.choice(source or fresh_prompts)
            jobs.append((pid, text, rng.randrange(2**31), rng.choice(grid)))
        tested = _generate(models[plan.version_id], plan.version_id, jobs)
        parent = _generate(models[plan.parent_id], plan.parent_id, jobs)
        for a, b in zip(tested, parent, strict=True):
            if a.sha256 == b.sha256:
                continue  # the same picture: nothing to compare
            first, second = (a, b) if rng.random() < 0.5 else (b, a)
            out.append(_PendingPair(PairKind.ab, first, second, ab_test_id=plan.test_id))
    return out


def _split_ab(n: int, plans: list[ABPlan], remaining: int, rng: random.Random) -> list[int]:
    """How many of a batch of ``n`` (out of ``remaining`` still to make in this refill) are
    each plan's A/B pairs: each plan's outstanding ``todo`` spread evenly over the batches."""
    out = []
    left = n
    for p in plans:
        exact = n * p.todo / max(1, remaining)
        k = min(p.todo, left, int(exact) + (1 if rng.random() < exact - int(exact) else 0))
        out.append(k)
        left -= k
    return out


def _build_batch(
    n: int,
    *,
    prompts: list[tuple[int, str]],
    serving: Backbone,
    parent: Backbone | None,
    serving_id: int,
    parent_id: int | None,
    renderer_id: int | None,
    gold_fraction: float,
    rng: random.Random,
    ab: list[tuple[ABPlan, int]] | None = None,
    models: dict[int, Backbone] | None = None,
    eval_prompts: list[tuple[int, str]] | None = None,
    active_share: float = 0.0,
    active_candidates: int = 1,
) -> _Batch:
    ab = [(p, k) for p, k in (ab or []) if k > 0]
    n_ab = sum(k for _, k in ab)
    n_within, n_cross, n_gold = _plan(
        n - n_ab, gold_fraction, parent is not None, renderer_id is not None, rng
    )
    default_cfg = float(serving.extra.get("guidance_scale", 7.5))
    grid = [round(default_cfg * f, 3) for f in CFG_GRID]
    batch = _Batch()

    # Within-version: two seeds and two guidance scales per prompt. Active choice
    # (backend.active): ``n_active`` of them are the most different of ``active_candidates``
    # times as many candidate pairs, drawn the same way.
    n_active = active.active_count(n_within, active_share, rng)
    n_uniform = n_within - n_active
    n_drawn = n_uniform + n_active * max(1, active_candidates)
    jobs: list[tuple[int, str, int, float]] = []
    for _ in range(n_drawn):
        pid, text = rng.choice(prompts)
        jobs += [(pid, text, rng.randrange(2**31), rng.choice(grid)) for _ in range(2)]
    images = _generate(serving, serving_id, jobs)
    # identical images teach nothing
    drawn = [(images[i], images[i + 1]) for i in range(0, len(images), 2)]
    within = [(a, b) for a, b in drawn[:n_uniform] if a.sha256 != b.sha256]
    candidates = [(a, b) for a, b in drawn[n_uniform:] if a.sha256 != b.sha256]
    if n_active:
        distances = [active.pair_distance(a.thumb, b.thumb) for a, b in candidates]
        within += [candidates[i] for i in active.choose_pairs(distances, n_active)]
    for a, b in within:
        batch.pairs.append(_PendingPair(PairKind.within_version, a, b))

    # Cross-version: one seed and scale, two models.
    if n_cross and parent is not None and parent_id is not None:
        cjobs = []
        for _ in range(n_cross):
            pid, text = rng.choice(prompts)
            cjobs.append((pid, text, rng.randrange(2**31), rng.choice(grid)))
        new = _generate(serving, serving_id, cjobs)
        old = _generate(parent, parent_id, cjobs)
        for a, b in zip(new, old, strict=True):
            if a.sha256 == b.sha256:
                continue
            # Side a is random so that "image_a" never means "the newer version".
            batch.pairs.append(
                _PendingPair(PairKind.cross_version, a, b)
                if rng.random() < 0.5
                else _PendingPair(PairKind.cross_version, b, a)
            )

    # A/B: a tested version against its parent, one seed and scale, sides random.
    if ab:
        batch.pairs += _ab_pairs(
            ab,
            models=models or {},
            fresh_prompts=prompts,
            eval_prompts=eval_prompts or [],
            grid=grid,
            rng=rng,
        )

    # Gold: the world's true render against a render of a different scene.
    if n_gold and renderer_id is not None:
        resolution = int(serving.resolution)
        made = 0
        for _ in range(n_gold * 4):
            if made == n_gold:
                break
            pid, text = rng.choice(prompts)
            gp = _gold_pair(pid, text, renderer_id, resolution, rng)
            if gp is not None:
                batch.pairs.append(gp)
                made += 1
    rng.shuffle(batch.pairs)
    return batch


def _commit_batch(
    session_factory: SessionFactory, store: ImageStore, batch: _Batch, rng: random.Random
) -> int:
    """Write the batch's files, then insert its rows in one transaction; returns pairs added.

    Each image goes through :func:`backend.services.images.store_image` (file written
    atomically first, then its row), so a row never exists without its file.
    """
    if not batch.pairs:
        return 0
    with session_factory() as session:
        try:
            rows: dict[int, Image] = {}
            for p in batch.pairs:
                for img in (p.a, p.b):
                    if id(img) in rows:
                        continue
                    row = image_service.store_image(
                        session,
                        store,
                        version_id=img.version_id,
                        prompt_id=img.prompt_id,
                        data=img.png,
                        seed=img.seed,
                        cfg=img.cfg,
                        steps=img.steps,
                        sampler=img.sampler,
                        width=img.width,
                        height=img.height,
                    )
                    if row.sha256 != img.sha256:
                        raise RuntimeError(
                            f"stored image sha256 {row.sha256} != generated {img.sha256}"
                        )
                    img.rel_path = row.storage_path
                    rows[id(img)] = row
            for p in batch.pairs:
                pair_service.create_pair(
                    session,
                    kind=p.kind,
                    image_a_id=rows[id(p.a)].id,
                    image_b_id=rows[id(p.b)].id,
                    gold_answer=p.gold_answer,
                    rng=rng,
                    ab_test_id=p.ab_test_id,
                )
            session.commit()
        except BaseException:
            session.rollback()
            raise
    return len(batch.pairs)


# ---------------------------------------------------------------------------- entry point
def refill_pool(
    session_factory: SessionFactory,
    settings: Settings,
    *,
    max_new: int | None = None,
    seed: int | None = None,
) -> int:
    """Top the pool up to ``settings.pair_pool_target`` ready pairs; returns how many were made.

    Args:
        session_factory: opens write sessions (e.g. ``Database.write_session``).
        settings: target size, overlap, gold fraction, base model, data directories.
        max_new: make at most this many pairs in this call (default: the whole deficit).
        seed: seeds prompt, seed and guidance choices (default: fresh randomness).
    """
    rng = random.Random(seed)
    base_model = settings.base_model
    serving_id = ensure_serving_version(session_factory, base_model)
    with session_factory() as session:
        retired = retire_done_pairs(session, overlap=settings.pair_overlap, serving_id=serving_id)
        session.commit()
    if retired:
        log.info("retired %d pairs from the pool", retired)
    if ensure_prompts(session_factory, base_model) == 0:
        log.warning("no active prompts: import some (POST /api/v1/prompts) to fill the pool")
        return 0

    with session_factory() as session:
        deficit = settings.pair_pool_target - count_ready(session, settings.pair_overlap)
        serving_row = session.get(ModelVersion, serving_id)
        assert serving_row is not None
        parent_id = serving_row.parent_id
        prompts = [
            (int(pid), str(text))
            for pid, text in session.execute(
                select(Prompt.id, Prompt.text).where(Prompt.active.is_(True)).order_by(Prompt.id)
            )
        ]
        plans = ab_plans(session, serving_id, settings)
        total_share = sum(p.share for p in plans)
        fraction = ab_pair_fraction(total_share, settings.pair_overlap)
        for p in plans:
            # Keep this test's part of the ready pairs, even when the pool is otherwise full:
            # a new test starts at once.
            target = settings.pair_pool_target
            want = max(1, round(fraction * target * p.share / total_share)) if target > 0 else 0
            p.todo = max(0, want - p.ready)
        plans = [p for p in plans if p.todo > 0]
        todo = max(deficit, sum(p.todo for p in plans))
        if max_new is not None:
            todo = min(todo, max_new)
        if todo <= 0:
            return 0
        artifacts = artifact_store(settings)
        chains = {
            vid: model_registry.lineage(session, vid, artifacts)
            for vid in {
                serving_id,
                parent_id,
                *(v for p in plans for v in (p.version_id, p.parent_id)),
            }
            if vid is not None
        }
        session.rollback()
    # Models load outside any transaction (SQLite write sessions hold the database lock).
    models = {vid: model_registry.load_chain(chain) for vid, chain in chains.items()}
    serving = models[serving_id]
    parent = models[parent_id] if parent_id is not None else None
    eval_prompts: list[tuple[int, str]] = []
    if plans:
        eval_ids = set(ab_eval_prompt_ids(session_factory, base_model))
        with session_factory() as session:
            eval_prompts = [
                (int(pid), str(text))
                for pid, text in session.execute(
                    select(Prompt.id, Prompt.text)
                    .where(Prompt.id.in_(eval_ids))
                    .order_by(Prompt.id)
                )
            ]
            session.rollback()
    renderer_id = None
    if (
        settings.gold_fraction > 0
        and serving.kind == "pixel"
        and model_registry.is_builtin(base_model)
    ):
        renderer_id = renderer_version_id(session_factory)

    store = image_store(settings)
    made = 0
    while made < todo:
        n = min(BATCH_PAIRS, todo - made)
        split = _split_ab(n, plans, todo - made, rng)
        for p, k in zip(plans, split, strict=True):
            p.todo -= k
        batch = _build_batch(
            n,
            prompts=prompts,
            serving=serving,
            parent=parent,
            serving_id=serving_id,
            parent_id=parent_id,
            renderer_id=renderer_id,
            gold_fraction=settings.gold_fraction,
            rng=rng,
            ab=list(zip(plans, split, strict=True)),
            models=models,
            eval_prompts=eval_prompts,
            active_share=settings.pair_active_share,
            active_candidates=settings.pair_active_candidates,
        )
        added = _commit_batch(session_factory, store, batch, rng)
        made += added
        if added == 0:
            break  # the model makes identical images for everything: nothing to pair
    log.info("pool refill: %d new pairs (deficit was %d)", made, deficit)
    return made


__all__ = [
    "BATCH_PAIRS",
    "ABPlan",
    "ab_eval_prompt_ids",
    "ab_pair_fraction",
    "ab_plans",
    "CROSS_VERSION_FRACTION",
    "count_ready",
    "refill_pool",
    "retire_done_pairs",
]
