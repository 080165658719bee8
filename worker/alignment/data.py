"""The data side of a training run: preference pairs, images as tensors, the seeded stream.

- :class:`PreferencePair`: one preference (winner, loser, prompt; or a tie).
- :func:`image_to_tensor`: any image the project handles -> ``[3, R, R]`` in [-1, 1].
- :func:`split_by_prompt`: a deterministic held-out split in which no prompt is on both sides.
- :class:`PairDataset` / :func:`collate` / :class:`SeededEpochSampler`: the trainer's data stream,
  in which every draw has a *position*, so that each pair's randomness (timestep, noise, VAE
  sample) is seeded by ``(seed, position)`` (:func:`derive_seed`) and a run is a function of
  (seed, data, config).

Pure torch / numpy; nothing here imports from the web or database layers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

__all__ = [
    "ImageLike",
    "PairDataset",
    "PreferencePair",
    "SEED_TAG_EVAL",
    "SEED_TAG_LOADER",
    "SEED_TAG_ORDER",
    "SEED_TAG_PAIR",
    "SEED_TAG_PROBE",
    "SeededEpochSampler",
    "collate",
    "data_fingerprint",
    "derive_seed",
    "image_to_tensor",
    "split_by_prompt",
]

SEED_TAG_ORDER = 1
SEED_TAG_PAIR = 2
SEED_TAG_LOADER = 3
SEED_TAG_EVAL = 4
SEED_TAG_SPLIT = 5
SEED_TAG_PROBE = 6

# np.ndarray uint8 [H, W, 3] | PIL.Image.Image | torch.Tensor float [3, H, W] in [-1, 1]
ImageLike = Any


@dataclass
class PreferencePair:
    """One human (or simulated) preference: ``winner`` was preferred to ``loser`` for ``prompt``.

    Images are uint8 ``[H, W, 3]`` numpy arrays, PIL images, or float tensors ``[3, H, W]`` in
    [-1, 1]. ``tie=True`` marks a tie (Pick-a-Pic label 0.5): dropped from training unless
    ``TrainConfig.include_ties``.
    """

    prompt: str
    winner: ImageLike
    loser: ImageLike
    tie: bool = False


def image_to_tensor(image: ImageLike, resolution: int) -> torch.Tensor:
    """An image -> float32 ``[3, resolution, resolution]`` in [-1, 1].

    Accepts a uint8 ``[H, W, 3]`` array (numpy or torch), a PIL image, or a float tensor
    ``[3, H, W]`` in [-1, 1]. Non-square images are centre-cropped; other sizes are resized
    (bilinear, antialiased).
    """
    if isinstance(image, torch.Tensor) and image.is_floating_point():
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"a float image tensor must be [3, H, W], got {tuple(image.shape)}")
        x = image.detach().to("cpu", torch.float32)
        if not torch.isfinite(x).all() or x.min() < -1.0001 or x.max() > 1.0001:
            raise ValueError("a float image tensor must hold finite values in [-1, 1]")
        x = x.clamp(-1, 1)
    else:
        if isinstance(image, torch.Tensor):
            arr = image.detach().cpu().numpy()
        elif isinstance(image, np.ndarray):
            arr = image
        elif hasattr(image, "convert") and hasattr(image, "size"):  # PIL.Image.Image
            arr = np.array(image.convert("RGB"))
        else:
            raise TypeError(f"unsupported image type {type(image).__name__}")
        if arr.dtype != np.uint8:
            raise ValueError(
                f"image arrays must be uint8 [H, W, 3], got dtype {arr.dtype}; pass floats as a "
                "torch tensor [3, H, W] in [-1, 1]"
            )
        if arr.ndim != 3 or arr.shape[2] not in (3, 4):
            raise ValueError(f"image arrays must be [H, W, 3], got shape {arr.shape}")
        x = torch.from_numpy(np.ascontiguousarray(arr[:, :, :3])).permute(2, 0, 1)
        x = x.to(torch.float32) / 127.5 - 1.0
    _, h, w = x.shape
    if h != w:
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        x = x[:, top : top + side, left : left + side]
    if x.shape[1] != resolution:
        x = F.interpolate(
            x[None],
            size=(resolution, resolution),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )[0].clamp(-1, 1)
    return x.contiguous()


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, via numpy's SeedSequence (no collisions between tuples)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))


class PairDataset(Dataset):
    """Items are looked up by ``(pair index, stream position)``; images converted lazily.

    ``images=False`` leaves the images out of the items (the trainer then reads the pairs'
    latents from its encode cache by ``index``).
    """

    def __init__(
        self, pairs: Sequence[PreferencePair], resolution: int, *, images: bool = True
    ) -> None:
        self.pairs = pairs
        self.resolution = resolution
        self.images = images

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, position = key
        pair = self.pairs[index]
        item: dict[str, Any] = {
            "prompt": pair.prompt,
            "tie": bool(pair.tie),
            "position": int(position),
            "index": int(index),
        }
        if self.images:
            item["winner"] = image_to_tensor(pair.winner, self.resolution)
            item["loser"] = image_to_tensor(pair.loser, self.resolution)
        return item


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    batch: dict[str, Any] = {
        "prompt": [it["prompt"] for it in items],
        "tie": torch.tensor([it["tie"] for it in items], dtype=torch.bool),
        "position": torch.tensor([it["position"] for it in items], dtype=torch.long),
        "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
    }
    if "winner" in items[0]:
        batch["winner"] = torch.stack([it["winner"] for it in items])
        batch["loser"] = torch.stack([it["loser"] for it in items])
    return batch


class SeededEpochSampler(Sampler):
    """A permutation of the pairs per epoch, from (seed, epoch); yields (index, position).

    ``position = epoch * n + rank in the epoch`` numbers every draw of the data stream; the
    trainer seeds each pair's randomness from it. (No ``set_epoch`` method on purpose:
    accelerate's dataloader would reset it to its own iteration count, which restarts at 0 after
    a resume. The trainer calls :meth:`set_stream_epoch`.)
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.seed = seed
        self.epoch = 0

    def set_stream_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(derive_seed(self.seed, SEED_TAG_ORDER, self.epoch))
        perm = torch.randperm(self.n, generator=g).tolist()
        base = self.epoch * self.n
        for rank, index in enumerate(perm):
            yield index, base + rank


def data_fingerprint(pairs: Sequence[PreferencePair]) -> str:
    h = hashlib.sha256()
    h.update(str(len(pairs)).encode())
    for p in pairs:
        h.update(b"\x00" + p.prompt.encode("utf-8") + (b"\x01" if p.tie else b"\x02"))
    return h.hexdigest()


def split_by_prompt(
    pairs: Sequence[PreferencePair], fraction: float, seed: int = 0
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Splits ``pairs`` into ``(train, held_out)`` by prompt: every pair of a prompt goes to the
    same side, so nothing the model trains on is evaluated.

    Prompts are shuffled with ``seed`` (deterministic: a retried round gets the same split) and
    whole prompts are moved to the held-out side until it holds ``round(fraction * len(pairs))``
    pairs or more. ``fraction=0`` holds nothing out. At least one prompt always stays on the
    training side; a split that would leave the held-out side empty (one prompt only, or a
    fraction too small for one pair) returns ``(pairs, [])``.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    pairs = list(pairs)
    target = round(fraction * len(pairs))
    if target == 0:
        return pairs, []
    by_prompt: dict[str, list[int]] = {}
    for i, p in enumerate(pairs):
        by_prompt.setdefault(p.prompt, []).append(i)
    prompts = sorted(by_prompt)
    if len(prompts) < 2:
        return pairs, []
    order = np.random.default_rng(derive_seed(seed, SEED_TAG_SPLIT)).permutation(len(prompts))
    held: set[int] = set()
    for rank in order[:-1]:  # never the last prompt: the training side keeps at least one
        if len(held) >= target:
            break
        held.update(by_prompt[prompts[rank]])
    return (
        [p for i, p in enumerate(pairs) if i not in held],
        [p for i, p in enumerate(pairs) if i in held],
    )
