"""The built-in judge's evaluation of a trained model against its parent.

A round on the built-in model (``builtin:shapes``) that produces a candidate records, besides
its held-out preference evaluation, what the judge (:mod:`worker.shapes.judge`) thinks: the
parent and the new model draw images for the same held-out prompts of the world with fixed
seeds, and the metrics record both mean scores, their difference and its standard error, and
whether the new model improved (:func:`evaluate_against_parent`, called by
:func:`worker.rounds.run_round`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

#: Evaluation images use seeds ``EVAL_SEED + i`` and a fixed choice of held-out prompts.
EVAL_SEED = 1234


def eval_prompts(n: int) -> list[str]:
    """``n`` held-out prompts of the built-in world, always the same ones for a given ``n``."""
    from worker.shapes import world

    _, held_out = world.split_prompts()
    order = np.random.default_rng(EVAL_SEED).permutation(len(held_out))
    return [held_out[i] for i in order[: min(n, len(held_out))]]


def judge_scores(backbone: Any, prompts: list[str]) -> np.ndarray:
    """The judge's score of each prompt's image (seed ``EVAL_SEED + i``)."""
    from worker.alignment.sampling import sample
    from worker.shapes.judge import judge

    images = sample(backbone, prompts, [EVAL_SEED + i for i in range(len(prompts))])
    return np.array([judge(g.image, p).score for g, p in zip(images, prompts, strict=True)])


def evaluate_against_parent(backbone: Any, n_prompts: int) -> dict[str, Any]:
    """Judge metrics of the trained model against its parent on held-out prompts."""
    from worker.model_registry import parent_view  # imports backend: not at module level

    prompts = eval_prompts(n_prompts)
    if not prompts:
        return {}
    new = judge_scores(backbone, prompts)
    with parent_view(backbone) as parent_model:
        old = judge_scores(parent_model, prompts)
    diff = new - old
    sem = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else 0.0
    return {
        "eval_prompts": len(prompts),
        "eval_seed": EVAL_SEED,
        "judge_parent": round(float(old.mean()), 5),
        "judge_new": round(float(new.mean()), 5),
        "judge_delta": round(float(diff.mean()), 5),
        "judge_delta_sem": round(sem, 5),
        "judge_win_rate": round(float((diff > 0).mean()), 4),
        "improved": bool(diff.mean() > 0),
    }
