"""Automatic metrics of real models (worker/auto_metrics.py) on tiny random CLIP models built
and saved here: CLIP score / PickScore against the model's own forward pass, the paired
statistics by hand, the evaluation with fake samplers, and the round's hook on the tiny SD."""

from __future__ import annotations

import math
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from worker import auto_metrics as am


@pytest.fixture(scope="module")
def tiny_clip_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from worker.alignment.tiny_models import build_tiny_clip_tokenizer

    tokenizer = build_tiny_clip_tokenizer()
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=len(tokenizer),
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=32,
            image_size=32,
            patch_size=8,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
        ),
        projection_dim=16,
    )
    model = CLIPModel(config).eval()
    with torch.no_grad():  # a logit scale other than the init, so PickScore's factor shows
        model.logit_scale.fill_(math.log(20.0))
    path = tmp_path_factory.mktemp("tiny-clip") / "clip"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(path)
    return path


def _images(n: int, seed: int, size: tuple[int, int] = (32, 32)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(n)]


def _own_forward(path: Path, images: list[np.ndarray], prompts: list[str]):
    """The CLIP model's own forward pass: its normalised embeddings and logit scale."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(path, local_files_only=True).eval()
    tok = CLIPTokenizer.from_pretrained(path, local_files_only=True)
    proc = CLIPImageProcessor.from_pretrained(path, local_files_only=True)
    inputs = tok(prompts, padding=True, truncation=True, return_tensors="pt")
    pixels = proc(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            pixel_values=pixels,
        )
    cos = (out.image_embeds * out.text_embeds).sum(-1).numpy()
    return cos, float(model.logit_scale.detach().exp()), out.logits_per_image.diagonal().numpy()


def test_clip_score_and_pickscore_match_the_models_own_embeddings(tiny_clip_path: Path) -> None:
    images = _images(2, seed=1)
    prompts = ["a red circle", "two blue squares on grass"]
    cos, scale, logits = _own_forward(tiny_clip_path, images, prompts)

    clip = am.ClipScorer.from_pretrained(tiny_clip_path, device="cpu")
    np.testing.assert_allclose(clip.score(images, prompts), 100 * np.maximum(cos, 0), atol=1e-4)
    # The clamp at 0 is part of the definition: a negative cosine scores 0.
    assert all(s >= 0 for s in clip.score(_images(6, seed=2), ["x", "y", "z", "a", "b", "c"]))

    pick = am.PickScorer.from_pretrained(tiny_clip_path, device="cpu")
    assert scale == pytest.approx(20.0, rel=1e-5)
    np.testing.assert_allclose(pick.score(images, prompts), scale * cos, atol=1e-4)
    np.testing.assert_allclose(pick.score(images, prompts), logits, atol=1e-4)

    # Another image size goes through the image processor (resize + crop) like any other.
    assert clip.score(_images(1, seed=3, size=(48, 40)), ["a"]).shape == (1,)
    with pytest.raises(FileNotFoundError):
        am.ClipScorer.from_pretrained(tiny_clip_path / "missing")


def test_paired_metric_by_hand() -> None:
    parent = [1.0, 2.0, 3.0, 4.0]
    candidate = [1.1, 1.9, 3.2, 4.0]  # diffs 0.1, -0.1, 0.2, 0.0
    r = am.paired_metric(parent, candidate)
    mean = 0.05
    sd = math.sqrt(((0.05) ** 2 + (0.15) ** 2 + (0.15) ** 2 + (0.05) ** 2) / 3)
    assert r["n"] == 4
    assert r["delta"] == pytest.approx(mean)
    assert r["sem"] == pytest.approx(sd / 2)
    assert r["interval"] == pytest.approx([mean - 1.959964 * sd / 2, mean + 1.959964 * sd / 2])
    assert r["win_rate"] == pytest.approx((1 + 0 + 1 + 0.5) / 4)
    assert r["parent"] == pytest.approx(2.5) and r["candidate"] == pytest.approx(2.55)
    one = am.paired_metric([1.0], [2.0])
    assert one["sem"] == 0.0 and one["delta"] == 1.0
    assert am.paired_metric([], []) == {"n": 0}
    with pytest.raises(ValueError):
        am.paired_metric([1.0, 2.0], [1.0])


def test_metric_prompts_are_the_first_distinct_held_out_prompts() -> None:
    prompts, seeds = am.metric_prompts(["b", "a", "b", " ", "c", "d"], n=3)
    assert prompts == ["b", "a", "c"]
    assert seeds == [am.METRIC_SEED, am.METRIC_SEED + 1, am.METRIC_SEED + 2]
    assert am.metric_prompts([], n=3) == ([], [])


def test_evaluate_versions_pairs_the_same_prompt_and_seed(tiny_clip_path: Path) -> None:
    clip = am.ClipScorer.from_pretrained(tiny_clip_path, device="cpu")
    pick = am.PickScorer.from_pretrained(tiny_clip_path, device="cpu")
    prompts, seeds = am.metric_prompts(["a cat", "a dog", "a tree"], n=3)
    parent_images, new_images = _images(3, seed=10), _images(3, seed=11)
    calls: list[tuple[str, list[str], list[int]]] = []

    def sampler(name: str, images: list[np.ndarray]):
        def _sample(p: list[str], s: list[int]) -> list[np.ndarray]:
            calls.append((name, p, s))
            return images

        return _sample

    scorers = {"clip_score": clip, "pickscore": pick}
    same = am.evaluate_versions(
        sampler("new", parent_images), sampler("old", parent_images), prompts, seeds, scorers
    )
    assert calls == [("new", prompts, seeds), ("old", prompts, seeds)]
    assert same["prompts"] == 3
    for name in scorers:
        assert same[name]["delta"] == 0.0 and same[name]["sem"] == 0.0
        assert same[name]["win_rate"] == 0.5

    r = am.evaluate_versions(
        sampler("new", new_images), sampler("old", parent_images), prompts, seeds, scorers
    )
    want = am.paired_metric(clip.score(parent_images, prompts), clip.score(new_images, prompts))
    got = r["clip_score"]
    assert got["interval"] == pytest.approx(want.pop("interval"))
    assert {k: v for k, v in got.items() if k != "interval"} == pytest.approx(want)
    flat = am.flat_metrics(r)
    assert flat["auto_metric_prompts"] == 3
    assert flat["clip_delta"] == pytest.approx(want["delta"], abs=1e-5)
    assert flat["clip_delta_sem"] == pytest.approx(want["sem"], abs=1e-5)
    assert flat["pickscore_delta"] == pytest.approx(r["pickscore"]["delta"], abs=1e-5)
    assert "aesthetic_delta" not in flat

    with pytest.raises(ValueError, match="returned 2 images"):
        am.evaluate_versions(
            sampler("new", new_images[:2]), sampler("old", parent_images), prompts, seeds, scorers
        )


def test_aesthetic_predictor_is_linear_layers_over_the_normalised_embedding(
    tiny_clip_path: Path, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(
        torch.nn.Linear(16, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 4), torch.nn.Linear(4, 1)
    )
    state = {f"layers.{k}": v for k, v in mlp.state_dict().items()}
    torch.save(state, tmp_path / "aesthetic.pth")
    settings = types.SimpleNamespace(
        clip_model_path=tiny_clip_path,
        pickscore_model_path=None,
        aesthetic_model_path=tmp_path / "aesthetic.pth",
    )
    scorers = am.build_scorers(settings, device="cpu")
    assert set(scorers) == {"clip_score", "aesthetic"}
    images = _images(3, seed=4)
    emb = scorers["clip_score"].image_embeddings(images)
    with torch.no_grad():
        want = mlp.eval()(emb)[:, 0].numpy()
    np.testing.assert_allclose(scorers["aesthetic"].score(images, ["a"] * 3), want, atol=1e-5)
    # A predictor for another embedding size is refused with the reason.
    torch.save({"weight": torch.zeros(1, 768), "bias": torch.zeros(1)}, tmp_path / "l14.pth")
    settings.aesthetic_model_path = tmp_path / "l14.pth"
    with pytest.raises(ValueError, match="768-d"):
        am.build_scorers(settings, device="cpu")


def test_settings_refuse_a_missing_model_path(tiny_clip_path: Path, tmp_path: Path) -> None:
    from pydantic import ValidationError

    from backend.settings import Settings, format_validation_error

    ok = Settings(clip_model_path=tiny_clip_path, data_dir=tmp_path)
    assert ok.clip_model_path == tiny_clip_path and ok.metric_prompts == 32
    assert am.configured(ok) and not am.configured(Settings(data_dir=tmp_path))
    with pytest.raises(ValidationError) as exc:
        Settings(pickscore_model_path=tmp_path / "nope", data_dir=tmp_path)
    assert format_validation_error(exc.value).startswith("PREFLOOP_PICKSCORE_MODEL_PATH: no such")
    with pytest.raises(ValidationError) as exc:
        Settings(aesthetic_model_path=tiny_clip_path, data_dir=tmp_path)
    assert "PREFLOOP_AESTHETIC_MODEL_PATH" in format_validation_error(exc.value)


def test_round_metrics_on_the_tiny_sd(tiny_sd, tiny_clip_path: Path) -> None:
    """The round's hook: a fresh LoRA (B = 0) is its parent, so every paired delta is 0; a
    scorer that raises is recorded, never raised."""
    from worker.alignment.adapters import add_lora

    add_lora(tiny_sd, rank=4)
    tiny_sd.extra["num_inference_steps"] = 2  # the sampler's default steps: keep it quick
    settings = types.SimpleNamespace(
        clip_model_path=tiny_clip_path,
        pickscore_model_path=tiny_clip_path,
        aesthetic_model_path=None,
        metric_prompts=2,
    )
    m = am.round_metrics(tiny_sd, ["a red circle", "a red circle", "a blue square", "x"], settings)
    assert m["auto_metric_prompts"] == 2
    for prefix in ("clip", "pickscore"):
        assert m[f"{prefix}_delta"] == 0.0 and m[f"{prefix}_delta_sem"] == 0.0
        assert m[f"{prefix}_new"] == m[f"{prefix}_parent"]

    class Broken:
        def score(self, images, prompts):
            raise RuntimeError("out of memory")

    bad = am.round_metrics(tiny_sd, ["a"], settings, scorers={"clip_score": Broken()})
    assert bad == {"auto_metric_error": "RuntimeError: out of memory"}
    none = types.SimpleNamespace(clip_model_path=None, metric_prompts=2)
    assert am.round_metrics(tiny_sd, ["a"], none) == {}
