"""What a training run reports: per optimizer step (:class:`StepMetrics`) and per held-out
evaluation (:class:`EvalMetrics`). Plain dataclasses, JSON-ready through ``as_dict``."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["EvalMetrics", "StepMetrics"]


@dataclass
class StepMetrics:
    """What one optimizer step reports (means over the step's micro-batches and processes).

    Attributes:
        step: 1-based optimizer step just completed.
        total_steps: ``TrainConfig.steps``.
        loss: the preference loss.
        implicit_acc: fraction of pairs where the model moved towards the winner more than the
            reference (D^w < D^l).
        reward_margin: mean implicit reward margin -(β/2) w (D^w - D^l).
        model_mse: the trained model's denoising MSE.
        ref_mse: the reference's denoising MSE.
        lr: learning rate used by this step.
        grad_norm: global gradient norm before clipping.
        timestep_histogram: counts of the step's sampled timesteps in ``histogram_bins`` equal
            bins over [0, T).
        seconds: wall time of the step.
    """

    step: int
    total_steps: int
    loss: float
    implicit_acc: float
    reward_margin: float
    model_mse: float
    ref_mse: float
    lr: float
    grad_norm: float
    timestep_histogram: list[int]
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EvalMetrics:
    """One evaluation of the policy on the held-out pairs, at fixed timesteps and noise draws
    (:class:`worker.alignment.holdout.HeldOutSet`).

    Attributes:
        step: optimizer steps trained when it was measured (0: before training, the reference).
        accuracy: held-out preference accuracy: the fraction of pairs whose implicit reward
            margin favours the annotators' winner (a pair with a zero margin counts half, so the
            reference scores exactly 0.5).
        loss: held-out preference loss ``mean(-log σ(-β/2 · Δ))``, Δ the pair's mean over the
            fixed draws of ``(D^w - D^l)``; ln 2 at the reference.
        margin: mean implicit reward margin ``-β/2 · Δ`` (positive: towards the winners).
        drift: how far the policy has moved from its reference:
            ``Σ‖ε_θ - ε_ref‖² / Σ‖ε - ε_ref‖²`` over the held-out images and draws (0 at the
            reference; docs/alignment-benchmark.md, "Drift").
        model_mse, ref_mse: mean denoising errors (ε units) of the policy and the reference on
            the held-out images; their ratio is the "model/ref MSE" of earlier reports.
        pairs: held-out pairs evaluated.
        seconds: wall time of the evaluation.
        fidelity: the fidelity probe's mean paired change of the family's fidelity metric
            against the reference (:mod:`worker.alignment.fidelity`; 0 at the reference,
            negative: less faithful), or None when the run has no probe.
        fidelity_sem: its standard error.
    """

    step: int
    accuracy: float
    loss: float
    margin: float
    drift: float
    model_mse: float
    ref_mse: float
    pairs: int
    seconds: float = 0.0
    fidelity: float | None = None
    fidelity_sem: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
