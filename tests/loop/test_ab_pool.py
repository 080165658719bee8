"""The pair pool's A/B pairs (worker.pair_pool) on a real SQLite database and the tiny model:
candidate-vs-parent pairs while a gate is open (their share, same prompt and fresh seeds,
random sides, prompts from the fixed evaluation set and fresh ones), never a candidate image
anywhere else, retired with their test, and the smaller live share after publishing."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch
from sqlalchemy import select

from backend.models import ABPhase, ABState, Image, ModelVersion, Pair, PairKind, Prompt
from backend.services import ab_tests, publishing
from backend.services import versions as version_service
from worker import model_registry, pair_pool


def _candidate(settings: Any, db: Any, name: str = "cand") -> int:
    """A child of the serving version with a random LoRA adapter, left a candidate, its gate
    opened by the (human) policy."""
    from worker.alignment.adapters import add_lora, save_adapter

    with db.read_session() as s:
        parent = version_service.serving_version(s)
        backbone = model_registry.load_version(
            s, parent.id, models_dir=settings.models_dir, fresh=True
        )
    params = add_lora(backbone, rank=2)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.2, generator=torch.Generator().manual_seed(p.numel()))
    rel = f"versions/{name}/adapter.safetensors"
    sha = save_adapter(backbone.unet, settings.models_dir / rel)
    with db.transaction() as s:
        v = ModelVersion(
            name=name,
            parent_id=parent.id,
            base_model=parent.base_model,
            adapter_path=rel,
            adapter_sha256=sha,
            metrics={},
        )
        s.add(v)
        s.flush()
        out = publishing.on_candidate(s, v, settings)
        assert out.action == "ab_gate", out
        return v.id


def _rows(db: Any) -> tuple[dict[int, Image], list[Pair], dict[int, Prompt]]:
    with db.read_session() as s:
        images = {i.id: i for i in s.scalars(select(Image))}
        pairs = list(s.scalars(select(Pair).order_by(Pair.id)))
        prompts = {p.id: p for p in s.scalars(select(Prompt))}
    return images, pairs, prompts


def test_an_open_gate_gets_its_share_of_candidate_vs_parent_pairs(make_env: Any) -> None:
    settings, db = make_env(pair_pool_target=20, ab_share=0.5)
    pair_pool.refill_pool(db.write_session, settings, seed=0)  # a full pool, no candidate
    with db.read_session() as s:
        parent_id = version_service.serving_version(s).id
    cand = _candidate(settings, db)

    # The pool is full, yet the new gate gets its pairs at once.
    made = pair_pool.refill_pool(db.write_session, settings, seed=1)
    images, pairs, prompts = _rows(db)
    ab = [p for p in pairs if p.kind == PairKind.ab and p.active]
    assert made == len(ab) == 10  # ab_share 0.5 of a target of 20
    seeds = []
    sides = Counter()
    sources = Counter()
    for p in ab:
        a, b = images[p.image_a_id], images[p.image_b_id]
        assert {a.version_id, b.version_id} == {cand, parent_id}
        assert a.prompt_id == b.prompt_id == p.prompt_id
        assert (a.seed, a.cfg, a.steps) == (b.seed, b.cfg, b.steps)  # only the model differs
        assert a.sha256 != b.sha256
        seeds.append(a.seed)
        sides[a.version_id == cand] += 1
        sources[
            "eval" if prompts[p.prompt_id].source == pair_pool.AB_EVAL_PROMPT_SOURCE else "fresh"
        ] += 1
        with db.read_session() as s:
            test = s.get(ab_tests.ABTest, p.ab_test_id)
            assert (test.version_id, ABPhase(test.phase)) == (cand, ABPhase.gate)
    assert len(set(seeds)) == len(seeds)  # a fresh seed per pair
    within_seeds = {images[p.image_a_id].seed for p in pairs if p.kind != PairKind.ab}
    assert not set(seeds) & within_seeds
    assert sides[True] and sides[False], sides  # the candidate is on either side
    assert sources["eval"] and sources["fresh"], sources
    # The fixed evaluation set: the world's held-out prompts, stored inactive.
    from worker.shapes.world import split_prompts

    eval_prompts = [p for p in prompts.values() if p.source == pair_pool.AB_EVAL_PROMPT_SOURCE]
    assert len(eval_prompts) == pair_pool.AB_EVAL_PROMPTS
    assert all(not p.active and p.text in set(split_prompts()[1]) for p in eval_prompts)

    # A candidate's images appear in its A/B pairs and nowhere else.
    for p in pairs:
        if p.kind != PairKind.ab:
            assert cand not in (images[p.image_a_id].version_id, images[p.image_b_id].version_id)

    # Nothing more to make while the share is met.
    assert pair_pool.refill_pool(db.write_session, settings, seed=2) == 0

    # Decided: the test's pairs leave the pool and no new ones are made.
    with db.transaction() as s:
        test = ab_tests.get_test(s, cand, ABPhase.gate)
        ab_tests.record_decision(s, test, ABState.reject, tally=None, reason="test", action="none")
    pair_pool.refill_pool(db.write_session, settings, seed=3)
    _, pairs, _ = _rows(db)
    assert not [p for p in pairs if p.kind == PairKind.ab and p.active]


def test_after_publishing_the_live_share_compares_it_with_its_parent(make_env: Any) -> None:
    settings, db = make_env(pair_pool_target=20, ab_live_share=0.1)
    pair_pool.refill_pool(db.write_session, settings, seed=0)
    with db.read_session() as s:
        parent_id = version_service.serving_version(s).id
    cand = _candidate(settings, db)
    with db.transaction() as s:
        publishing.publish_version(s, cand, settings, by="a test")
        live = ab_tests.get_test(s, cand, ABPhase.live)
        assert live is not None and live.state == ABState.open
        gate = ab_tests.get_test(s, cand, ABPhase.gate)
        assert gate.state == ABState.overridden
    pair_pool.refill_pool(db.write_session, settings, seed=4)
    images, pairs, _ = _rows(db)
    active = [p for p in pairs if p.active]
    ab = [p for p in active if p.kind == PairKind.ab]
    assert len(ab) == 2  # 10% of 20
    assert all(p.ab_test_id == live.id for p in ab)
    for p in ab:
        assert {images[p.image_a_id].version_id, images[p.image_b_id].version_id} == {
            cand,
            parent_id,
        }
    # The new version serves: its within-version pairs.
    within = [p for p in active if p.kind == PairKind.within_version]
    assert within and all(images[p.image_a_id].version_id == cand for p in within)


def test_an_ab_pair_is_served_once_and_then_retired(make_env: Any, loop: Any) -> None:
    from backend.services import pairs as pair_service

    settings, db = make_env(pair_pool_target=8, ab_share=0.5)
    pair_pool.ensure_serving_version(db.write_session, settings.base_model)
    cand = _candidate(settings, db)
    pair_pool.refill_pool(db.write_session, settings, seed=0)
    users = [loop.add_annotator(db, f"u{i}") for i in range(3)]
    served: list[int] = []
    with db.transaction() as s:
        for u in users:
            while True:
                got = pair_service.serve_next_pair(
                    s, user_id=u, daily_cap=100, weekly_cap=100, gold_fraction=0.0
                )
                if got is None:
                    break
                if got.kind == PairKind.ab:
                    served.append(got.pair_id)
    assert len(served) == len(set(served)) == 4  # every A/B pair once, to one annotator
    pair_pool.refill_pool(db.write_session, settings, seed=1)
    _, pairs, _ = _rows(db)
    by_id = {p.id: p for p in pairs}
    assert not any(by_id[pid].active for pid in served)  # retired once served
    fresh = [p for p in pairs if p.kind == PairKind.ab and p.active]
    assert len(fresh) == 4 and all(p.ab_test_id for p in fresh)
    assert cand


def test_the_ab_share_is_a_share_of_served_pairs_whatever_the_overlap(
    make_env: Any, loop: Any
) -> None:
    from backend.services import pairs as pair_service

    for share, overlap in [(0.25, 1), (0.25, 3), (0.1, 3), (0.5, 5)]:
        f = pair_pool.ab_pair_fraction(share, overlap)
        assert f / (f + overlap * (1 - f)) == pytest.approx(share)
    assert pair_pool.ab_pair_fraction(0.0, 3) == 0.0

    # Three annotators, each within-version pair served to all three, each A/B pair to one:
    # a quarter of what they are served is A/B.
    settings, db = make_env(pair_pool_target=16, ab_share=0.25, pair_overlap=3)
    pair_pool.ensure_serving_version(db.write_session, settings.base_model)
    _candidate(settings, db)
    pair_pool.refill_pool(db.write_session, settings, seed=0)
    kinds: Counter[PairKind] = Counter()
    users = [loop.add_annotator(db, f"u{i}") for i in range(3)]
    with db.transaction() as s:
        for _ in range(40):
            for u in users:
                got = pair_service.serve_next_pair(
                    s, user_id=u, daily_cap=1000, weekly_cap=1000, gold_fraction=0.0
                )
                if got is not None:
                    kinds[got.kind] += 1
    assert kinds[PairKind.ab] == 8 and kinds[PairKind.within_version] == 24, kinds
