"""The fidelity probe: an automatic measure of what a round may break, read along training.

Held-out votes say whether a round learned its annotators' preference; drift says how far the
policy moved. Neither says what the move cost in prompt fidelity: on the built-in world a round
at drift 0.064 lost 0.019 of the judge's score while another at 0.139 lost 0.010
(docs/rounds.md). When a model family has an automatic fidelity metric (the judge of the
built-in world; a CLIP-style score for text-to-image models), a :class:`FidelityProbe` samples
a fixed set of units ``(prompt, seed)`` from the policy at every held-out evaluation, scores
them, and reports the mean **paired change against the reference**, which samples the same
units once (adapters disabled: the run's own reference, so a resumed run measures against the
same model). The trainer's :class:`worker.alignment.guard.EvalTracker` then never keeps an
evaluation whose change is below ``-fidelity_budget``, and stops there.

The probe's units come from the round's *held-out* prompts (never trained on), with seeds fixed
by the round's seed, so a retried round measures the same thing and the product's test units
(the world's held-out prompts) are never looked at.

Pure of the web and the database: a probe is a list of units, a sampler and a scoring function.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from worker.alignment.data import SEED_TAG_PROBE, derive_seed

__all__ = ["FidelityProbe", "ProbeReading", "Sampler", "Scorer", "probe_units"]

#: ``(prompts, seeds) -> [N, H, W, 3] images`` of the model being probed.
Sampler = Callable[[list[str], list[int]], np.ndarray]
#: ``(images, prompts) -> [N]`` scores, higher is more faithful to the prompt.
Scorer = Callable[[np.ndarray, list[str]], np.ndarray]


def probe_units(prompts: Sequence[str], n: int, seed: int) -> tuple[list[str], list[int]]:
    """``n`` units over the distinct ``prompts`` (in sorted order, cycled), with seeds derived
    from ``seed``: the same for the same inputs, whatever order the prompts come in."""
    distinct = sorted(set(prompts))
    if n < 1 or not distinct:
        return [], []
    units = [distinct[i % len(distinct)] for i in range(n)]
    seeds = [derive_seed(seed, SEED_TAG_PROBE, i) % (2**31 - 1) for i in range(n)]
    return units, seeds


@dataclass(frozen=True)
class ProbeReading:
    """One reading of the probe: the policy's mean score, and its paired change against the
    reference's with the change's standard error (n - 1 degrees of freedom)."""

    score: float
    delta: float
    sem: float


@dataclass
class FidelityProbe:
    """Mean paired change of an automatic fidelity score against the run's reference.

    Attributes:
        prompts, seeds: the units; image ``i`` is ``prompts[i]`` drawn with ``seeds[i]``.
        score: the family's fidelity metric.
        name: the metric's name, for logs and metrics (``"judge"``).
        num_inference_steps: sampling steps of the probe's images (None: the model's own).
        batch_size: images per sampling call.
        reference_scores: the reference's scores, set by :meth:`set_reference` (once per run).
    """

    prompts: list[str]
    seeds: list[int]
    score: Scorer
    name: str = "fidelity"
    num_inference_steps: int | None = None
    batch_size: int = 64
    reference_scores: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.seeds):
            raise ValueError(f"{len(self.prompts)} prompts but {len(self.seeds)} seeds")
        if not self.prompts:
            raise ValueError("a fidelity probe needs at least one unit")

    def __len__(self) -> int:
        return len(self.prompts)

    def _scores(self, sample: Sampler) -> np.ndarray:
        images = sample(list(self.prompts), list(self.seeds))
        scores = np.asarray(self.score(np.asarray(images), list(self.prompts)), dtype=np.float64)
        if scores.shape != (len(self),):
            raise ValueError(f"the scorer returned shape {scores.shape}, expected ({len(self)},)")
        if not np.isfinite(scores).all():
            raise ValueError("the scorer returned a non-finite score")
        return scores

    def set_reference(self, sample: Sampler) -> None:
        """Scores the reference's images of the units (call with the reference's sampler)."""
        self.reference_scores = self._scores(sample)

    def read(self, sample: Sampler) -> ProbeReading:
        """Scores the policy's images and compares them, unit by unit, with the reference's."""
        if self.reference_scores is None:
            raise RuntimeError("set_reference() first: the probe has no reference scores")
        scores = self._scores(sample)
        diff = scores - self.reference_scores
        n = len(diff)
        sem = float(diff.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
        return ProbeReading(score=float(scores.mean()), delta=float(diff.mean()), sem=sem)
