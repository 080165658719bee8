"""Validation images: a fixed grid of prompts rendered by a round's parent and candidate.

Every round renders the same prompts with the same seeds from the parent model and from the
candidate, so two versions can be compared by eye (the dashboard, ``GET
/api/v1/versions/{id}/samples``). The files live beside the version's adapter, in
``<models_dir>/versions/<name>/samples/``:

- ``parent-00.png``, ``candidate-00.png``, ... one image per prompt and model, at the model's
  own resolution;
- ``grid.png``: one row per prompt, parent | candidate, separated by a thin line; cells are
  upscaled (NEAREST) to at least :data:`MIN_CELL` pixels so the 32-px built-in images are
  visible, and large images are shrunk to at most :data:`MAX_CELL` pixels (the full-size
  images are the separate files);
- ``samples.json`` (:data:`MANIFEST`): prompts, seeds, file names, creation time. The backend
  reads only this JSON (it imports no torch and nothing from ``worker``).

Writing is atomic: everything goes into a temporary directory beside ``dest``, is fsynced, and
the directory is renamed into place (an old ``dest`` is first renamed aside and removed
afterwards). A crash or a failing sampler never leaves a half-written grid at ``dest``.

This module is a pure function of the two samplers: no database, no settings.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from backend.fileio import fsync_dir

__all__ = [
    "GRID",
    "MANIFEST",
    "MANIFEST_FORMAT",
    "MAX_CELL",
    "MIN_CELL",
    "SAMPLES_DIRNAME",
    "VALIDATION_SEED",
    "Sampler",
    "render_validation_grid",
    "sampler_for",
    "validation_prompts",
    "validation_seeds",
]

SAMPLES_DIRNAME = "samples"
MANIFEST = "samples.json"
GRID = "grid.png"
MANIFEST_FORMAT = 1
VALIDATION_SEED = 4321
#: Grid cells are at least this many pixels on their longer side (NEAREST upscaling) ...
MIN_CELL = 128
#: ... and at most this many (images larger than this are shrunk in the grid only).
MAX_CELL = 256
#: Width of the lines between the grid's columns and rows, and their colour.
SEPARATOR = 4
SEPARATOR_COLOUR = (255, 255, 255)
#: Temporary / trash directories of an interrupted render older than this are removed.
STALE_SECONDS = 3600.0

#: ``sampler(prompts, seeds)`` -> one ``[H, W, 3]`` uint8 image per prompt, in order.
Sampler = Callable[[list[str], list[int]], list[np.ndarray]]


# ------------------------------------------------------------------------------ inputs
def validation_seeds(n: int) -> list[int]:
    """The seeds of the validation grid: ``VALIDATION_SEED + i``."""
    return [VALIDATION_SEED + i for i in range(n)]


def validation_prompts(
    base_model_family: str, held_out_prompts: list[str], n: int = 8
) -> list[str]:
    """The grid's prompts, the same for every round on a base model.

    Args:
        base_model_family: ``backend.model_family.family_of(base_model).name``
            (``"builtin"`` for the built-in model).
        held_out_prompts: prompts not trained on (used for every family but the built-in one).
        n: how many.

    Returns:
        built-in family: ``n`` of the built-in world's held-out prompts
        (``worker.shapes.world.split_prompts``), chosen by a permutation seeded with
        :data:`VALIDATION_SEED`, so always the same ones; otherwise the first ``n`` distinct
        non-blank ``held_out_prompts``; ``[]`` when there are none (or ``n <= 0``).
    """
    if n <= 0:
        return []
    from backend.model_family import BUILTIN

    if base_model_family == BUILTIN.name:
        from worker.shapes.world import split_prompts

        _, held_out = split_prompts()
        order = np.random.default_rng(VALIDATION_SEED).permutation(len(held_out))
        return [held_out[i] for i in order[: min(n, len(held_out))]]
    out: list[str] = []
    seen: set[str] = set()
    for prompt in held_out_prompts:
        if not isinstance(prompt, str) or not prompt.strip() or prompt in seen:
            continue
        seen.add(prompt)
        out.append(prompt)
        if len(out) == n:
            break
    return out


def sampler_for(backbone: Any, **sample_kwargs: Any) -> Sampler:
    """A :data:`Sampler` drawing from ``backbone`` with :func:`worker.alignment.sampling.sample`
    (``sample_kwargs``: its keyword arguments, e.g. ``num_inference_steps``; by default the
    backbone's own settings, as the round's judge evaluation uses)."""

    def _sample(prompts: list[str], seeds: list[int]) -> list[np.ndarray]:
        from worker.alignment.sampling import sample

        return [g.image for g in sample(backbone, prompts, seeds, **sample_kwargs)]

    return _sample


# ------------------------------------------------------------------------------ images
def _checked_images(images: Any, n: int, who: str) -> list[np.ndarray]:
    images = list(images)
    if len(images) != n:
        raise ValueError(f"the {who} sampler returned {len(images)} images for {n} prompts")
    out = []
    for i, image in enumerate(images):
        arr = np.asarray(image)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3 or 0 in arr.shape:
            raise ValueError(
                f"the {who} sampler's image {i} is {arr.dtype} {arr.shape}, expected uint8 [H, W, 3]"
            )
        out.append(np.ascontiguousarray(arr))
    return out


def _cell_factor(images: Sequence[np.ndarray], upscale: int | None) -> float:
    """The scale of every image in the grid."""
    if upscale is not None:
        return float(upscale)
    side = max(max(im.shape[0], im.shape[1]) for im in images)
    if side < MIN_CELL:
        return float(math.ceil(MIN_CELL / side))
    if side > MAX_CELL:
        return MAX_CELL / side
    return 1.0


def _scaled(image: np.ndarray, factor: float) -> Image.Image:
    pil = Image.fromarray(image, mode="RGB")
    if factor == 1.0:
        return pil
    h, w = image.shape[:2]
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    return pil.resize(size, Image.Resampling.NEAREST if factor > 1 else Image.Resampling.LANCZOS)


def _grid(
    parents: list[np.ndarray], candidates: list[np.ndarray], upscale: int | None
) -> Image.Image:
    factor = _cell_factor(parents + candidates, upscale)
    rows = [
        (_scaled(p, factor), _scaled(c, factor)) for p, c in zip(parents, candidates, strict=True)
    ]
    cell_w = max(im.width for row in rows for im in row)
    cell_h = max(im.height for row in rows for im in row)
    width = 2 * cell_w + SEPARATOR
    height = len(rows) * cell_h + (len(rows) - 1) * SEPARATOR
    grid = Image.new("RGB", (width, height), SEPARATOR_COLOUR)
    for r, row in enumerate(rows):
        top = r * (cell_h + SEPARATOR)
        for c, im in enumerate(row):
            left = c * (cell_w + SEPARATOR)
            grid.paste(im, (left + (cell_w - im.width) // 2, top + (cell_h - im.height) // 2))
    return grid


# ------------------------------------------------------------------------------ files
def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "xb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _png(image: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _remove_stale(parent: Path, name: str) -> None:
    """Remove temporary and trash directories left by interrupted renders of ``name``."""
    now = time.time()
    for prefix in (f".{name}.tmp-", f".{name}.old-"):
        for leftover in parent.glob(f"{prefix}*"):
            try:
                if now - leftover.stat().st_mtime > STALE_SECONDS:
                    shutil.rmtree(leftover, ignore_errors=True)
            except OSError:
                pass


def render_validation_grid(
    sample_candidate: Sampler,
    sample_parent: Sampler,
    prompts: list[str],
    seeds: list[int],
    dest: Path,
    *,
    upscale: int | None = None,
) -> dict[str, Any]:
    """Render ``prompts`` (image i with ``seeds[i]``) from the parent, then from the candidate,
    and write them, a composite grid and the manifest to the directory ``dest`` atomically.

    Args:
        sample_candidate, sample_parent: :data:`Sampler` s (:func:`sampler_for`). The parent
            is sampled first, completely, then the candidate, so the two may be views of one
            backbone that the caller switches inside the callables.
        prompts, seeds: the grid (:func:`validation_prompts`, :func:`validation_seeds`).
        dest: the samples directory, usually ``<version dir>/samples`` (:data:`SAMPLES_DIRNAME`);
            replaced as a whole if it exists.
        upscale: integer NEAREST scale of the images in ``grid.png``; by default small images
            are upscaled to at least :data:`MIN_CELL` pixels and large ones shrunk to
            :data:`MAX_CELL`.

    Returns:
        The manifest written to ``dest / MANIFEST``.

    Raises:
        ValueError: bad arguments, or a sampler returned the wrong number or kind of images.
        Whatever a sampler raises. In every failure ``dest`` is left as it was.
    """
    prompts = list(prompts)
    seeds = [int(s) for s in seeds]
    if not prompts:
        raise ValueError("no validation prompts")
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if len(prompts) > 100:
        raise ValueError(
            f"at most 100 validation prompts (file names have 2 digits), got {len(prompts)}"
        )
    if upscale is not None and (not isinstance(upscale, int) or upscale < 1):
        raise ValueError(f"upscale must be a positive int, got {upscale!r}")
    dest = Path(dest)

    parents = _checked_images(sample_parent(list(prompts), list(seeds)), len(prompts), "parent")
    candidates = _checked_images(
        sample_candidate(list(prompts), list(seeds)), len(prompts), "candidate"
    )
    grid = _grid(parents, candidates, upscale)

    files = [
        {
            "prompt": p,
            "seed": s,
            "parent": f"parent-{i:02d}.png",
            "candidate": f"candidate-{i:02d}.png",
        }
        for i, (p, s) in enumerate(zip(prompts, seeds, strict=True))
    ]
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "prompts": prompts,
        "seeds": seeds,
        "files": files,
        "grid": GRID,
        "created_at": datetime.now(UTC).isoformat(),
    }

    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(dest.parent, dest.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    trash: Path | None = None
    try:
        for entry, parent_im, candidate_im in zip(files, parents, candidates, strict=True):
            _write_bytes(tmp / entry["parent"], _png(Image.fromarray(parent_im, mode="RGB")))
            _write_bytes(tmp / entry["candidate"], _png(Image.fromarray(candidate_im, mode="RGB")))
        _write_bytes(tmp / GRID, _png(grid))
        _write_bytes(tmp / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the API may run as another user
        fsync_dir(tmp)
        if dest.exists() or dest.is_symlink():
            trash = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            os.rename(dest, trash / dest.name)
        try:
            os.replace(tmp, dest)
        except BaseException:
            if trash is not None:  # put the old samples back
                os.rename(trash / dest.name, dest)
            raise
        fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    return manifest
