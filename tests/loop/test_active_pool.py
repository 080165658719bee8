"""Active choice in the pool (PREFLOOP_PAIR_ACTIVE_SHARE): at share 1 every within-version
pair is one of the most different of its batch's candidates; at share 0 the pool draws as
before. Real SQLite, the tiny built-in checkpoint, the real sampler."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from PIL import Image as PILImage
from sqlalchemy import select

from backend.active import pair_distance
from backend.models import Image, Pair, PairKind, Prompt
from worker import pair_pool


def _spy_generate(monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[Any], list[Any]]]:
    """Record every ``_generate`` call's jobs and images."""
    calls: list[tuple[list[Any], list[Any]]] = []
    real = pair_pool._generate

    def spy(backbone: Any, version_id: int, jobs: list[Any]) -> list[Any]:
        out = real(backbone, version_id, jobs)
        calls.append((list(jobs), out))
        return out

    monkeypatch.setattr(pair_pool, "_generate", spy)
    return calls


def _stored_pairs(db: Any) -> list[tuple[str, str, int]]:
    with db.read_session() as s:
        images = {i.id: i for i in s.scalars(select(Image))}
        pairs = s.scalars(select(Pair).where(Pair.kind == PairKind.within_version)).all()
        return [
            (images[p.image_a_id].sha256, images[p.image_b_id].sha256, p.prompt_id) for p in pairs
        ]


def _pixels(png: bytes) -> np.ndarray:
    with PILImage.open(io.BytesIO(png)) as im:
        return np.asarray(im.convert("RGB"))


def test_share_one_fills_the_pool_with_the_most_different_candidates(
    make_env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, db = make_env(
        pair_pool_target=6, gold_fraction=0.0, pair_active_share=1.0, pair_active_candidates=3
    )
    calls = _spy_generate(monkeypatch)
    assert pair_pool.refill_pool(db.write_session, settings, seed=5) == 6

    assert len(calls) == 1  # one batch: within-version pairs only (no parent, no gold)
    jobs, images = calls[0]
    assert len(jobs) == 2 * 6 * 3  # 3 candidate pairs for each of the 6 pairs
    candidates = [(images[i], images[i + 1], jobs[i][0]) for i in range(0, len(images), 2)]
    # the distances, recomputed here from the PNG bytes (not the pool's thumbnails)
    dist = [pair_distance(_pixels(a.png), _pixels(b.png)) for a, b, _ in candidates]
    assert len(set(dist)) == len(dist)  # no tie at the cut, so the choice is unique
    order = sorted(range(len(candidates)), key=lambda i: -dist[i])
    chosen = {
        (candidates[i][0].sha256, candidates[i][1].sha256, candidates[i][2]) for i in order[:6]
    }

    stored = _stored_pairs(db)
    assert len(stored) == 6 and set(stored) == chosen
    # the pool's prompts are the chosen candidates' prompts
    with db.read_session() as s:
        prompt_ids = set(s.scalars(select(Pair.prompt_id)))
        assert prompt_ids == {candidates[i][2] for i in order[:6]}
        assert all(s.get(Prompt, pid).active for pid in prompt_ids)
    # and each stored pair is farther apart than every candidate left out
    kept = [dist[i] for i in order[:6]]
    left = [dist[i] for i in order[6:]]
    assert min(kept) > max(left)


def test_share_zero_draws_exactly_as_without_active_choice(
    make_env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, db = make_env(pair_pool_target=5, gold_fraction=0.0)
    assert settings.pair_active_share == 0.0  # the default
    calls = _spy_generate(monkeypatch)
    assert pair_pool.refill_pool(db.write_session, settings, seed=5) == 5
    jobs, images = calls[0]
    assert len(jobs) == 2 * 5  # no extra candidates
    stored = _stored_pairs(db)
    drawn = {(images[i].sha256, images[i + 1].sha256, jobs[i][0]) for i in range(0, 10, 2)}
    assert set(stored) == drawn
