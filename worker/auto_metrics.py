"""Automatic metrics for real models (SD1.5 / SDXL): CLIP score, PickScore and the LAION
aesthetic score of a candidate against its parent, paired on the same (prompt, seed).

The built-in model keeps its judge (:mod:`worker.shapes.evaluation`). For the other families a
round that makes a candidate renders a fixed prompt set (:func:`metric_prompts`: the first
``PREFLOOP_METRIC_PROMPTS`` distinct held-out prompts, seeds ``METRIC_SEED + i``) from the
candidate and from its parent with the same sampling code as the validation grid
(:func:`worker.validation_grid.sampler_for`), scores every image with each configured scorer,
and records the paired differences (:func:`round_metrics`, called by :func:`worker.rounds`).

Scorers are built only from local directories (``local_files_only=True``); nothing is
downloaded. Which ones run depends on the settings:

- ``PREFLOOP_CLIP_MODEL_PATH``: a ``transformers`` CLIP directory (model, tokenizer, image
  processor) -> ``clip_*`` metrics (:class:`ClipScorer`), the prompt-fidelity metric.
- ``PREFLOOP_PICKSCORE_MODEL_PATH``: PickScore (``yuvalkirstain/PickScore_v1``, a CLIP-H
  fine-tune; its directory must also hold the tokenizer and image processor, which the
  original repository keeps in ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``) ->
  ``pickscore_*`` metrics (:class:`PickScorer`), the preference metric.
- ``PREFLOOP_AESTHETIC_MODEL_PATH``: LAION's aesthetic predictor state dict (``.pth`` /
  ``.pt`` / ``.safetensors``: an MLP, or a single linear layer, over L2-normalised CLIP
  image embeddings; the released one expects CLIP ViT-L/14's 768-d embeddings), run on the
  embeddings of ``PREFLOOP_CLIP_MODEL_PATH`` -> ``aesthetic_*`` metrics
  (:class:`AestheticScorer`).

This module imports no database code; settings come in as an object with those attributes.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

log = logging.getLogger(__name__)

#: Metric images use seeds ``METRIC_SEED + i`` (i: the prompt's index in the fixed set).
METRIC_SEED = 4321
#: z of the two-sided 95% normal interval.
Z95 = 1.959964
#: Images / prompts per forward pass of a scorer.
BATCH = 16
#: ``sampler(prompts, seeds)`` -> one ``[H, W, 3]`` uint8 image per prompt
#: (:data:`worker.validation_grid.Sampler`).
Sampler = Callable[[list[str], list[int]], list[np.ndarray]]
#: Metric keys of the round (prefixes of ``<prefix>_delta`` etc.) per scorer name.
PREFIX = {"clip_score": "clip", "pickscore": "pickscore", "aesthetic": "aesthetic"}


class Scorer(Protocol):
    def score(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> np.ndarray: ...


# ---------------------------------------------------------------------------- scorers
def _features(out: Any) -> Any:
    """``get_*_features`` returns a tensor (transformers 4) or an output whose
    ``pooler_output`` is the projected embedding (transformers 5)."""
    import torch

    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipScorer:
    """CLIP score (Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation Metric for
    Image Captioning", arXiv:2104.08718, with w = 100 as in ``torchmetrics``' ``CLIPScore``):
    ``100 * max(cos(E_image, E_text), 0)`` per (image, prompt)."""

    def __init__(self, model: Any, tokenizer: Any, image_processor: Any, device: str = "cpu"):
        self.model = model.eval().to(device)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.device = device

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | None = None) -> ClipScorer:
        """Model, tokenizer and image processor from the local directory ``path`` only."""
        import torch
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"no CLIP model directory at {path}")
        model = CLIPModel.from_pretrained(path, local_files_only=True)
        tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
        processor = CLIPImageProcessor.from_pretrained(path, local_files_only=True)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(model, tokenizer, processor, device)

    def image_embeddings(self, images: Sequence[np.ndarray]) -> Any:
        """L2-normalised image embeddings ``[N, D]`` (float32, on the CPU)."""
        import torch

        out = []
        for i in range(0, len(images), BATCH):
            batch = [np.asarray(im) for im in images[i : i + BATCH]]
            pixels = self.image_processor(images=batch, return_tensors="pt")["pixel_values"]
            with torch.inference_mode():
                emb = _features(self.model.get_image_features(pixel_values=pixels.to(self.device)))
            out.append(emb.float().cpu())
        emb = torch.cat(out)
        return emb / emb.norm(dim=-1, keepdim=True)

    def text_embeddings(self, prompts: Sequence[str]) -> Any:
        """L2-normalised text embeddings ``[N, D]`` (prompts truncated to the model's length)."""
        import torch

        max_len = int(self.model.config.text_config.max_position_embeddings)
        out = []
        for i in range(0, len(prompts), BATCH):
            tok = self.tokenizer(
                list(prompts[i : i + BATCH]),
                padding=True,
                truncation=True,
                max_length=min(max_len, self.tokenizer.model_max_length),
                return_tensors="pt",
            )
            with torch.inference_mode():
                emb = _features(
                    self.model.get_text_features(
                        input_ids=tok["input_ids"].to(self.device),
                        attention_mask=tok["attention_mask"].to(self.device),
                    )
                )
            out.append(emb.float().cpu())
        emb = torch.cat(out)
        return emb / emb.norm(dim=-1, keepdim=True)

    def cosine(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> np.ndarray:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        if not len(images):
            return np.zeros(0)
        cos = (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(-1)
        return cos.numpy().astype(np.float64)

    def score(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> np.ndarray:
        return 100.0 * np.maximum(self.cosine(images, prompts), 0.0)


class PickScorer(ClipScorer):
    """PickScore (Kirstain et al. 2023, "Pick-a-Pic", arXiv:2305.01569): the fine-tuned CLIP
    model's ``logit_scale.exp() * cos(E_image, E_text)`` (not clamped)."""

    def score(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> np.ndarray:
        scale = float(self.model.logit_scale.detach().exp().cpu())
        return scale * self.cosine(images, prompts)


class AestheticScorer:
    """LAION's aesthetic predictor (``improved-aesthetic-predictor``): Linear layers (no
    activations in the released MLP; dropout is inactive at inference) over the L2-normalised
    CLIP image embedding. The prompt is not used."""

    def __init__(self, clip: ClipScorer, layers: list[tuple[Any, Any]]):
        self.clip = clip
        self.layers = layers
        dim = int(clip.model.config.projection_dim)
        if layers[0][0].shape[1] != dim or layers[-1][0].shape[0] != 1:
            raise ValueError(
                f"the aesthetic predictor takes {layers[0][0].shape[1]}-d embeddings to "
                f"{layers[-1][0].shape[0]} outputs; the CLIP model gives {dim}-d embeddings "
                "(the LAION predictor needs CLIP ViT-L/14)"
            )

    @staticmethod
    def load_layers(path: str | Path) -> list[tuple[Any, Any]]:
        """``(weight, bias)`` of each Linear layer of a state dict, in layer order."""
        import torch

        path = Path(path)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        weights = {
            k.removesuffix("weight").removesuffix("."): v
            for k, v in state.items()
            if (k == "weight" or k.endswith(".weight")) and v.ndim == 2
        }

        def order(name: str) -> list[int]:
            return [int(n) for n in re.findall(r"\d+", name)]

        layers = []
        for name in sorted(weights, key=order):
            bias = state.get(f"{name}.bias" if name else "bias")
            layers.append((weights[name].float(), None if bias is None else bias.float()))
        if not layers:
            raise ValueError(f"{path} holds no Linear weights")
        return layers

    def score(self, images: Sequence[np.ndarray], prompts: Sequence[str] = ()) -> np.ndarray:
        if not len(images):
            return np.zeros(0)
        x = self.clip.image_embeddings(images)
        for w, b in self.layers:
            x = x @ w.T + (b if b is not None else 0.0)
        return x[:, 0].numpy().astype(np.float64)


# ---------------------------------------------------------------------------- statistics
def paired_metric(parent_scores: Sequence[float], candidate_scores: Sequence[float]) -> dict:
    """Candidate minus parent, paired per (prompt, seed): the means, the mean difference, its
    standard error (sample sd / sqrt(n); 0 for one pair), the 95% normal interval
    ``delta ± 1.96 sem`` and the win rate (share of pairs where the candidate scores higher;
    ties count half)."""
    old = np.asarray(parent_scores, dtype=np.float64)
    new = np.asarray(candidate_scores, dtype=np.float64)
    if old.shape != new.shape or old.ndim != 1:
        raise ValueError(f"paired scores of shapes {old.shape} and {new.shape}")
    n = len(old)
    if n == 0:
        return {"n": 0}
    diff = new - old
    delta = float(diff.mean())
    sem = float(diff.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
    win = float(((diff > 0) + 0.5 * (diff == 0)).mean())
    return {
        "n": n,
        "parent": float(old.mean()),
        "candidate": float(new.mean()),
        "delta": delta,
        "sem": sem,
        "interval": [delta - Z95 * sem, delta + Z95 * sem],
        "win_rate": win,
    }


# ---------------------------------------------------------------------------- evaluation
def metric_prompts(held_out_prompts: Sequence[str], n: int = 32) -> tuple[list[str], list[int]]:
    """The fixed prompt set: the first ``n`` distinct non-blank held-out prompts, in order,
    and their seeds ``METRIC_SEED + i``."""
    prompts: list[str] = []
    seen: set[str] = set()
    for p in held_out_prompts:
        if len(prompts) >= n:
            break
        if isinstance(p, str) and p.strip() and p not in seen:
            seen.add(p)
            prompts.append(p)
    return prompts, [METRIC_SEED + i for i in range(len(prompts))]


def evaluate_versions(
    candidate_sampler: Sampler,
    parent_sampler: Sampler,
    prompts: Sequence[str],
    seeds: Sequence[int],
    scorers: dict[str, Scorer],
) -> dict[str, Any]:
    """Render every (prompt, seed) from both samplers (same seed for both) and score them:
    ``{name: paired_metric(...) for each scorer, "prompts": n}``."""
    prompts, seeds = list(prompts), list(seeds)
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts for {len(seeds)} seeds")
    out: dict[str, Any] = {"prompts": len(prompts)}
    if not prompts or not scorers:
        return out
    new_images = list(candidate_sampler(prompts, seeds))
    old_images = list(parent_sampler(prompts, seeds))
    for who, images in (("candidate", new_images), ("parent", old_images)):
        if len(images) != len(prompts):
            raise ValueError(f"the {who} sampler returned {len(images)} images for {len(prompts)}")
    for name, scorer in scorers.items():
        out[name] = paired_metric(
            scorer.score(old_images, prompts), scorer.score(new_images, prompts)
        )
    return out


def configured(settings: Any) -> bool:
    """Whether any scorer path is set."""
    return any(
        getattr(settings, k, None)
        for k in ("clip_model_path", "pickscore_model_path", "aesthetic_model_path")
    )


def build_scorers(settings: Any, device: str | None = None) -> dict[str, Scorer]:
    """The scorers whose local paths the settings name (CLIP is loaded once for CLIP score
    and the aesthetic predictor)."""
    scorers: dict[str, Scorer] = {}
    clip = None
    if getattr(settings, "clip_model_path", None):
        clip = ClipScorer.from_pretrained(settings.clip_model_path, device)
        scorers["clip_score"] = clip
    if getattr(settings, "pickscore_model_path", None):
        scorers["pickscore"] = PickScorer.from_pretrained(settings.pickscore_model_path, device)
    if getattr(settings, "aesthetic_model_path", None):
        if clip is None:
            raise ValueError(
                "PREFLOOP_AESTHETIC_MODEL_PATH needs PREFLOOP_CLIP_MODEL_PATH (its CLIP model)"
            )
        layers = AestheticScorer.load_layers(settings.aesthetic_model_path)
        scorers["aesthetic"] = AestheticScorer(clip, layers)
    return scorers


def flat_metrics(result: dict[str, Any]) -> dict[str, Any]:
    """:func:`evaluate_versions`' result as the round's flat metrics: ``<prefix>_parent``,
    ``_new``, ``_delta``, ``_delta_sem``, ``_win_rate`` per scorer, and
    ``auto_metric_prompts`` / ``auto_metric_seed``."""
    out: dict[str, Any] = {
        "auto_metric_prompts": int(result.get("prompts", 0)),
        "auto_metric_seed": METRIC_SEED,
    }
    for name, prefix in PREFIX.items():
        r = result.get(name)
        if not r or not r.get("n"):
            continue
        out.update(
            {
                f"{prefix}_parent": round(r["parent"], 5),
                f"{prefix}_new": round(r["candidate"], 5),
                f"{prefix}_delta": round(r["delta"], 5),
                f"{prefix}_delta_sem": round(r["sem"], 5),
                f"{prefix}_win_rate": round(r["win_rate"], 4),
            }
        )
    return out


def round_metrics(
    backbone: Any,
    held_out_prompts: Sequence[str],
    settings: Any,
    scorers: dict[str, Scorer] | None = None,
) -> dict[str, Any]:
    """The round's automatic metrics of the trained ``backbone`` against its parent (the
    backbone with its adapter disabled, :func:`worker.model_registry.parent_view`), on
    :func:`metric_prompts` of the held-out prompts (``settings.metric_prompts`` of them).
    ``{}`` when no scorer is configured or there are no prompts. Scorer models are loaded
    for the call and dropped after it."""
    from worker.model_registry import parent_view  # imports backend: not at module level
    from worker.validation_grid import sampler_for

    prompts, seeds = metric_prompts(held_out_prompts, int(getattr(settings, "metric_prompts", 32)))
    if not prompts or (scorers is None and not configured(settings)):
        return {}

    def sample_parent(p: list[str], s: list[int]) -> list[np.ndarray]:
        with parent_view(backbone) as parent_model:
            return sampler_for(parent_model)(p, s)

    try:
        if scorers is None:
            scorers = build_scorers(settings)
        result = evaluate_versions(sampler_for(backbone), sample_parent, prompts, seeds, scorers)
    except Exception as exc:  # noqa: BLE001 - a metric is information; the round stands
        log.exception("automatic metrics failed")
        return {"auto_metric_error": f"{type(exc).__name__}: {exc}"[:500]}
    finally:
        scorers = None
        _free_cuda()
    return flat_metrics(result)


def _free_cuda() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
