"""Active choice of pairs: which within-version pairs the pool serves (docs/active.md).

Pure functions (numpy only: no torch, no database) that :mod:`worker.pair_pool` and
``bench/active.py`` call.

The criterion: **the most different pair of several candidates.** For an actively chosen
pair, the pool samples ``candidates`` candidate pairs (each: a random prompt, two random
seeds and guidance scales, exactly as a uniform pair is drawn) and keeps, per batch, the ones
whose two images differ most (:func:`pair_distance`, the RMS difference of small thumbnails).
It chooses prompts and pairs at once: a prompt whose samples vary (where the model is least
settled) wins more often, and so does a pair of seeds that came out far apart. Why this one,
and what it costs, is argued in docs/active.md.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np

#: Thumbnails are box-downscaled by a whole factor until their longer side is at most this.
THUMB_SIDE = 32


def thumbnail(image: np.ndarray, side: int = THUMB_SIDE) -> np.ndarray:
    """``image`` (``[H, W, C]``; uint8 in 0..255, or float in [0, 1]) as float32 in [0, 1],
    box-downscaled by the smallest whole factor ``f`` with ``max(H, W) / f <= side`` (rows
    and columns beyond a multiple of ``f`` are dropped). A 512x512 image becomes 32x32 (the
    mean of each 16x16 block); a 32x32 one is only rescaled to [0, 1]."""
    img = np.asarray(image)
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3 or img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(f"expected an [H, W, C] image, got shape {img.shape}")
    if side < 1:
        raise ValueError("side must be >= 1")
    x = img.astype(np.float32) / 255.0 if img.dtype == np.uint8 else img.astype(np.float32)
    h, w, c = x.shape
    f = max(1, math.ceil(max(h, w) / side))
    if f > 1:
        hh, ww = (h // f) * f, (w // f) * f
        if hh == 0 or ww == 0:
            raise ValueError(f"image {h}x{w} is too thin to downscale by {f}")
        x = x[:hh, :ww].reshape(hh // f, f, ww // f, f, c).mean(axis=(1, 3))
    return x


def pair_distance(a: np.ndarray, b: np.ndarray) -> float:
    """How different two images are: the root mean squared difference of their thumbnails
    (:func:`thumbnail`), in [0, 1] (0: the same thumbnail; 1: black against white). Images
    of different sizes raise ``ValueError``."""
    ta, tb = thumbnail(a), thumbnail(b)
    if ta.shape != tb.shape:
        raise ValueError(f"images differ in size: {np.shape(a)} and {np.shape(b)}")
    d = ta.astype(np.float64) - tb.astype(np.float64)
    return float(np.sqrt(np.mean(d * d)))


def active_count(n: int, share: float, rng: random.Random) -> int:
    """How many of ``n`` pairs are chosen actively at ``share``: ``n * share`` with the
    fraction rounded up with that probability (so small batches honour the share on average).
    ``share`` 0 and 1 draw nothing from ``rng``: share 0 leaves the pool's random draws
    exactly as they were without active choice."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be in [0, 1], got {share}")
    if n <= 0 or share == 0.0:
        return 0
    if share == 1.0:
        return n
    exact = n * share
    whole = int(exact)
    return whole + (1 if rng.random() < exact - whole else 0)


def choose_pairs(distances: Sequence[float], n: int) -> list[int]:
    """The indices of the ``n`` largest ``distances`` (all of them if fewer), in ascending
    index order; equal distances go to the earlier index. A NaN distance is never chosen
    before a number."""
    if n < 0:
        raise ValueError("n must be >= 0")
    keyed = [(-(d if d == d else -math.inf), i) for i, d in enumerate(distances)]
    keyed.sort()
    return sorted(i for _, i in keyed[:n])


__all__ = ["THUMB_SIDE", "active_count", "choose_pairs", "pair_distance", "thumbnail"]
