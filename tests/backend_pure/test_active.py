"""backend.active: the active choice's distance, share and choice against hand-computed cases."""

from __future__ import annotations

import math
import random
import sys

import numpy as np
import pytest

from backend.active import active_count, choose_pairs, pair_distance, thumbnail


def test_the_module_imports_no_torch_and_no_database():
    import subprocess

    code = (
        "import sys, backend.active; "
        "bad = [m for m in ('torch', 'sqlalchemy', 'backend.db', 'worker') if m in sys.modules]; "
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_thumbnail_scales_uint8_and_keeps_small_images():
    img = np.array([[[0, 255, 51]]], dtype=np.uint8)  # 1x1
    assert thumbnail(img).tolist() == [[[0.0, 1.0, pytest.approx(0.2)]]]
    f = np.full((32, 32, 3), 0.25, dtype=np.float64)  # float images are taken as [0, 1]
    t = thumbnail(f)
    assert t.shape == (32, 32, 3) and t.dtype == np.float32 and float(t.max()) == 0.25


def test_thumbnail_box_downscales_by_a_whole_factor():
    # 64x64: factor 2. Each 2x2 block of a checkerboard holds two 0s and two 255s: 0.5.
    checker = ((np.indices((64, 64)).sum(axis=0) % 2) * 255).astype(np.uint8)
    t = thumbnail(np.repeat(checker[..., None], 3, axis=2))
    assert t.shape == (32, 32, 3)
    assert np.allclose(t, 0.5)
    # 70x33: factor ceil(70/32) = 3 -> rows 0..68 (23 blocks), columns 0..32 (11 blocks)
    x = np.zeros((70, 33, 1), dtype=np.uint8)
    x[:3, :3] = 255  # the first block: mean 1
    x[3, 0] = 255  # one pixel of the block below: mean 1/9
    x[69, :] = 255  # a row that is dropped
    t = thumbnail(x)
    assert t.shape == (23, 11, 1)
    assert t[0, 0, 0] == pytest.approx(1.0) and t[1, 0, 0] == pytest.approx(1 / 9)
    assert float(t.sum()) == pytest.approx(1 + 1 / 9)


def test_pair_distance_by_hand():
    black = np.zeros((8, 8, 3), dtype=np.uint8)
    white = np.full((8, 8, 3), 255, dtype=np.uint8)
    assert pair_distance(black, white) == pytest.approx(1.0)
    assert pair_distance(white, white) == 0.0
    half = black.copy()
    half[:4] = 255  # half the pixels differ by 1: sqrt(0.5)
    assert pair_distance(black, half) == pytest.approx(math.sqrt(0.5))
    one_channel = black.copy()
    one_channel[..., 0] = 102  # 0.4 on one channel of three: sqrt(0.16 / 3)
    assert pair_distance(one_channel, black) == pytest.approx(math.sqrt(0.16 / 3))
    # thumbnails first: a 64x64 checkerboard and flat grey are the same thumbnail
    checker = ((np.indices((64, 64)).sum(axis=0) % 2) * 255).astype(np.uint8)
    grey = np.full((64, 64), 0.5)
    assert pair_distance(checker, grey) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="differ in size"):
        pair_distance(black, np.zeros((16, 16, 3), dtype=np.uint8))


def test_choose_pairs_by_hand():
    d = [0.1, 0.5, 0.3, 0.5, 0.2]
    assert choose_pairs(d, 2) == [1, 3]
    assert choose_pairs(d, 3) == [1, 2, 3]  # ascending index order
    assert choose_pairs([0.2, 0.2, 0.2], 2) == [0, 1]  # ties: the earlier index
    assert choose_pairs([float("nan"), 0.0, 0.1], 2) == [1, 2]  # NaN last
    assert choose_pairs(d, 9) == [0, 1, 2, 3, 4]
    assert choose_pairs(d, 0) == [] and choose_pairs([], 3) == []
    with pytest.raises(ValueError):
        choose_pairs(d, -1)


class _Fixed(random.Random):
    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value
        self.calls = 0

    def random(self) -> float:
        self.calls += 1
        return self.value


def test_active_count_by_hand():
    # 10 * 0.25 = 2.5: 3 when the draw is below 0.5, else 2
    assert active_count(10, 0.25, _Fixed(0.49)) == 3
    assert active_count(10, 0.25, _Fixed(0.5)) == 2
    assert active_count(8, 0.5, _Fixed(0.99)) == 4  # exact: 4 (draw >= 0 fraction)
    for share, want in ((0.0, 0), (1.0, 7)):
        rng = _Fixed(0.0)
        assert active_count(7, share, rng) == want and rng.calls == 0  # no draw at 0 or 1
    assert active_count(0, 0.5, _Fixed(0.0)) == 0
    with pytest.raises(ValueError, match="share"):
        active_count(3, 1.5, random.Random(0))
    rng = random.Random(3)
    total = sum(active_count(7, 0.3, rng) for _ in range(4000))
    assert total / (7 * 4000) == pytest.approx(0.3, abs=0.01)
