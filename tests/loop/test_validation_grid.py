"""Validation grids (worker.validation_grid): parent and candidate rendered with the same seeds,
written atomically beside a version, described by a manifest the API reads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from worker.validation_grid import (
    GRID,
    MANIFEST,
    MIN_CELL,
    SAMPLES_DIRNAME,
    SEPARATOR,
    VALIDATION_SEED,
    render_validation_grid,
    sampler_for,
    validation_prompts,
    validation_seeds,
)

PROMPTS = ["a red circle", "a blue square", "a green triangle"]
RES = 16


@pytest.fixture(scope="module")
def tiny_pixel():
    from worker.alignment.tiny_models import build_tiny_pixel_backbone

    return build_tiny_pixel_backbone(seed=0, resolution=RES)


@pytest.fixture(scope="module")
def other_pixel():
    from worker.alignment.tiny_models import build_tiny_pixel_backbone

    return build_tiny_pixel_backbone(seed=1, resolution=RES)


def _sampler(backbone):
    return sampler_for(backbone, num_inference_steps=2, guidance_scale=3.0)


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_render_writes_images_grid_and_manifest(tmp_path, tiny_pixel, other_pixel):
    dest = tmp_path / "versions" / "round-1" / SAMPLES_DIRNAME
    seeds = validation_seeds(len(PROMPTS))
    assert seeds == [VALIDATION_SEED, VALIDATION_SEED + 1, VALIDATION_SEED + 2]
    manifest = render_validation_grid(
        _sampler(other_pixel), _sampler(tiny_pixel), PROMPTS, seeds, dest
    )
    names = {f"{who}-{i:02d}.png" for who in ("parent", "candidate") for i in range(3)}
    assert {p.name for p in dest.iterdir()} == names | {GRID, MANIFEST}
    for name in names:
        with Image.open(dest / name) as im:
            assert (im.format, im.mode, im.size) == ("PNG", "RGB", (RES, RES))
    # 16-px images are upscaled (NEAREST, integer factor) to at least MIN_CELL per cell
    factor = MIN_CELL // RES
    with Image.open(dest / GRID) as im:
        assert im.format == "PNG"
        assert im.size == (2 * RES * factor + SEPARATOR, 3 * RES * factor + 2 * SEPARATOR)
    grid = _pixels(dest / GRID)
    cell = RES * factor
    row1 = cell + SEPARATOR
    parent_1 = _pixels(dest / "parent-01.png").repeat(factor, 0).repeat(factor, 1)
    candidate_1 = _pixels(dest / "candidate-01.png").repeat(factor, 0).repeat(factor, 1)
    assert np.array_equal(grid[row1 : row1 + cell, :cell], parent_1)
    assert np.array_equal(grid[row1 : row1 + cell, cell + SEPARATOR :], candidate_1)

    on_disk = json.loads((dest / MANIFEST).read_text())
    assert on_disk == manifest
    assert manifest["prompts"] == PROMPTS
    assert manifest["seeds"] == seeds
    assert manifest["grid"] == GRID
    assert manifest["created_at"]
    assert manifest["files"] == [
        {
            "prompt": p,
            "seed": s,
            "parent": f"parent-{i:02d}.png",
            "candidate": f"candidate-{i:02d}.png",
        }
        for i, (p, s) in enumerate(zip(PROMPTS, seeds, strict=True))
    ]
    assert _leftovers(dest.parent) == []
    # different models, same seeds: the candidate's images differ from the parent's
    assert not np.array_equal(_pixels(dest / "parent-00.png"), _pixels(dest / "candidate-00.png"))


def test_same_model_same_seed_gives_identical_images(tmp_path, tiny_pixel):
    dest = tmp_path / SAMPLES_DIRNAME
    sampler = _sampler(tiny_pixel)
    render_validation_grid(sampler, sampler, PROMPTS, validation_seeds(3), dest)
    for i in range(3):
        parent = _pixels(dest / f"parent-{i:02d}.png")
        assert np.array_equal(parent, _pixels(dest / f"candidate-{i:02d}.png"))
    # and the images are deterministic across renders
    again = tmp_path / "again"
    render_validation_grid(sampler, sampler, PROMPTS, validation_seeds(3), again)
    for i in range(3):
        assert np.array_equal(
            _pixels(dest / f"parent-{i:02d}.png"), _pixels(again / f"parent-{i:02d}.png")
        )


def _solid(value: int, size: int = 8):
    def sampler(prompts: list[str], seeds: list[int]) -> list[np.ndarray]:
        return [np.full((size, size, 3), value, dtype=np.uint8) for _ in prompts]

    return sampler


def test_second_render_replaces_the_first_atomically(tmp_path):
    dest = tmp_path / SAMPLES_DIRNAME
    render_validation_grid(_solid(10), _solid(20), ["a", "b", "c"], [1, 2, 3], dest)
    (dest / "stray.txt").write_text("from the first render")
    second = render_validation_grid(_solid(30), _solid(40), ["d", "e"], [4, 5], dest)
    assert {p.name for p in dest.iterdir()} == {
        "parent-00.png",
        "parent-01.png",
        "candidate-00.png",
        "candidate-01.png",
        GRID,
        MANIFEST,
    }
    assert json.loads((dest / MANIFEST).read_text()) == second
    assert second["prompts"] == ["d", "e"]
    assert _pixels(dest / "parent-00.png")[0, 0].tolist() == [40, 40, 40]
    assert _pixels(dest / "candidate-01.png")[0, 0].tolist() == [30, 30, 30]
    assert _leftovers(tmp_path) == []
    assert [p.name for p in tmp_path.iterdir()] == [SAMPLES_DIRNAME]


def test_explicit_upscale(tmp_path):
    dest = tmp_path / SAMPLES_DIRNAME
    render_validation_grid(_solid(1), _solid(2), ["a"], [1], dest, upscale=3)
    with Image.open(dest / GRID) as im:
        assert im.size == (2 * 24 + SEPARATOR, 24)


def test_large_images_are_shrunk_in_the_grid_only(tmp_path):
    dest = tmp_path / SAMPLES_DIRNAME
    render_validation_grid(_solid(1, 512), _solid(2, 512), ["a"], [1], dest)
    with Image.open(dest / "parent-00.png") as im:
        assert im.size == (512, 512)
    with Image.open(dest / GRID) as im:
        assert im.size == (2 * 256 + SEPARATOR, 256)


def _boom(prompts: list[str], seeds: list[int]) -> list[np.ndarray]:
    raise RuntimeError("CUDA out of memory")


def test_failing_sampler_leaves_no_dest(tmp_path):
    dest = tmp_path / "v" / SAMPLES_DIRNAME
    with pytest.raises(RuntimeError, match="out of memory"):
        render_validation_grid(_boom, _solid(1), ["a", "b"], [1, 2], dest)
    assert not dest.exists()
    assert not dest.parent.exists() or _leftovers(dest.parent) == []


def test_failure_keeps_the_previous_grid(tmp_path, monkeypatch):
    dest = tmp_path / SAMPLES_DIRNAME
    first = render_validation_grid(_solid(1), _solid(2), ["a"], [1], dest)
    with pytest.raises(RuntimeError):
        render_validation_grid(_boom, _solid(2), ["b"], [2], dest)
    # a failure while writing the files (here: the manifest's encoding) leaves it too
    import worker.validation_grid as vg

    def broken_dumps(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(vg.json, "dumps", broken_dumps)
    with pytest.raises(OSError, match="disk full"):
        render_validation_grid(_solid(3), _solid(4), ["c"], [3], dest)
    monkeypatch.undo()
    assert json.loads((dest / MANIFEST).read_text()) == first
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("sampler", "message"),
    [
        (lambda p, s: [], "returned 0 images for 1 prompts"),
        (lambda p, s: [np.zeros((4, 4, 3), dtype=np.float32)], "expected uint8"),
        (lambda p, s: [np.zeros((4, 4), dtype=np.uint8)], "expected uint8"),
    ],
)
def test_bad_sampler_output_is_rejected(tmp_path, sampler, message):
    dest = tmp_path / SAMPLES_DIRNAME
    with pytest.raises(ValueError, match=message):
        render_validation_grid(sampler, _solid(1), ["a"], [1], dest)
    assert not dest.exists()


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="no validation prompts"):
        render_validation_grid(_solid(1), _solid(1), [], [], tmp_path / "s")
    with pytest.raises(ValueError, match="2 prompts but 1 seeds"):
        render_validation_grid(_solid(1), _solid(1), ["a", "b"], [1], tmp_path / "s")
    with pytest.raises(ValueError, match="upscale"):
        render_validation_grid(_solid(1), _solid(1), ["a"], [1], tmp_path / "s", upscale=0)


def test_validation_prompts_builtin_is_fixed_held_out():
    from worker.shapes.world import split_prompts

    _, held_out = split_prompts()
    prompts = validation_prompts("builtin", [], 8)
    assert len(prompts) == 8 == len(set(prompts))
    assert set(prompts) <= set(held_out)
    assert validation_prompts("builtin", ["ignored"], 8) == prompts
    assert validation_prompts("builtin", [], 3) == prompts[:3]


def test_validation_prompts_other_families():
    held = ["a cat", "", "a cat", "  ", "a dog", "a fox", "an owl"]
    assert validation_prompts("diffusers", held, 3) == ["a cat", "a dog", "a fox"]
    assert validation_prompts("diffusers", held, 10) == ["a cat", "a dog", "a fox", "an owl"]
    assert validation_prompts("diffusers", [], 8) == []
    assert validation_prompts("builtin", [], 0) == []
