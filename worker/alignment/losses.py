"""The preference loss the trainer optimises (Diffusion-DPO's form, with DDE's per-pair weight).

For a pair (x^w, x^l) noised to one shared timestep k with one shared noise ε, let m_w, m_l be the
trained model's per-sample noise-prediction MSEs and r_w, r_l the frozen reference's. With
D = m - r and the credit weight w of the pair (docs/dde.md; 1 in importance mode):

    loss_i = -log σ( -(β/2) · w_i · [(m_w - m_l) - (r_w - r_l)] )_i
    loss   = mean_i loss_i

β convention (pinned in tests/alignment/test_losses.py): this is Diffusion-DPO's reference code,
``-logsigmoid(-0.5 * beta_dpo * (model_diff - ref_diff))`` with β = 5000 for SD1.5 and SDXL.
diffusers' example script (``examples/research_projects/diffusion_dpo``, since PR #6788) writes
``-logsigmoid(beta_dpo * (ref_diff - model_diff))`` with default 2500: the same loss with the 0.5
folded into β. :func:`beta_from_diffusers_example` and :func:`beta_to_diffusers_example` convert.

The log-sigmoid is taken per sample and then averaged, never of a batch mean (diffusers #6702).
Only torch is imported here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "pair_losses",
    "PreferenceLossOutput",
    "beta_from_diffusers_example",
    "beta_to_diffusers_example",
    "epsilon_error_scale",
    "per_sample_mse",
    "preference_loss",
]


def beta_from_diffusers_example(beta: float) -> float:
    """β in this project's convention (the 0.5 kept) from diffusers' example β: 2500 -> 5000."""
    return 2.0 * float(beta)


def beta_to_diffusers_example(beta: float) -> float:
    """diffusers' example β (the 0.5 folded in) from this project's β: 5000 -> 2500."""
    return 0.5 * float(beta)


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample, in float32 (or wider, for float64 inputs).

    Args:
        pred: ``[B, ...]`` e.g. the UNet's noise prediction ``[B, C, H, W]``.
        target: ``[B, ...]`` same shape, e.g. the noise ε.

    Returns:
        ``[B]`` the mean of (pred - target)² over every non-batch dimension.
    """
    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target must have the same shape, got {tuple(pred.shape)} and "
            f"{tuple(target.shape)}"
        )
    if pred.ndim < 1:
        raise ValueError("pred and target need a batch dimension")
    dtype = torch.promote_types(torch.promote_types(pred.dtype, target.dtype), torch.float32)
    diff = pred.to(dtype) - target.to(dtype)
    return diff.square().reshape(diff.shape[0], -1).mean(dim=1)


def epsilon_error_scale(
    alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """Per-sample factors that turn a UNet's target MSE into the ε-prediction MSE.

    DDE's D_t (docs/dde.md) is defined on noise-prediction errors ‖ε - ε_θ‖², and its credit
    over timesteps is derived for them. With ``x_t = √ᾱ x_0 + √(1-ᾱ) ε``:

    - ``"epsilon"``: the error is already ‖ε - ε_θ‖²: factor 1;
    - ``"v_prediction"`` (``v = √ᾱ ε - √(1-ᾱ) x_0``): ``ε = √(1-ᾱ) x_t + √ᾱ v``, so
      ``ε - ε_θ = √ᾱ (v - v_θ)`` and the factor is ``ᾱ_t``;
    - ``"sample"`` (x_0-prediction): ``ε - ε_θ = -√(ᾱ/(1-ᾱ)) (x_0 - x̂_0)``, so the factor is
      ``SNR_t = ᾱ_t / (1-ᾱ_t)``.

    Shapes: ``alphas_cumprod [T]``, ``timesteps [B]`` (0-based) -> ``[B]`` float32.
    """
    if prediction_type == "epsilon":
        return torch.ones(timesteps.shape, dtype=torch.float32, device=timesteps.device)
    a = alphas_cumprod.to(device=timesteps.device, dtype=torch.float64)[timesteps.long()]
    if prediction_type == "v_prediction":
        return a.float()
    if prediction_type == "sample":
        return (a / (1.0 - a)).float()
    raise ValueError(
        f"unsupported prediction_type {prediction_type!r}; expected 'epsilon', 'v_prediction' "
        "or 'sample'"
    )


@dataclass
class PreferenceLossOutput:
    """What :func:`preference_loss` returns. Only ``loss`` and ``per_sample_loss`` carry
    gradients; the diagnostics are detached.

    Attributes:
        loss: ``[]`` mean over the batch of ``per_sample_loss``: what to backpropagate.
        per_sample_loss: ``[B]`` -log σ(z_i), z_i = -(β/2) w_i (D^w_i - D^l_i).
        implicit_acc: ``[]`` fraction of pairs with D^w < D^l (the model has moved towards the
            winner more than the reference has); ties count as wrong.
        reward_margin: ``[]`` mean of z_i = -(β/2) w_i (D^w_i - D^l_i), the implicit reward of the
            winner minus that of the loser; 0 at the reference, positive when the model
            prefers the winner.
        model_mse: ``[]`` (mean m_w + mean m_l) / 2, the trained model's denoising MSE.
        ref_mse: ``[]`` (mean r_w + mean r_l) / 2, the reference's.
    """

    loss: torch.Tensor
    per_sample_loss: torch.Tensor
    implicit_acc: torch.Tensor
    reward_margin: torch.Tensor
    model_mse: torch.Tensor
    ref_mse: torch.Tensor


def preference_loss(
    model_err_w: torch.Tensor,
    model_err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    *,
    beta: float,
    weights: torch.Tensor | None = None,
    winner_anchor: float = 0.0,
    loss_scale: torch.Tensor | None = None,
) -> PreferenceLossOutput:
    """Diffusion-DPO / DDE preference loss, per sample first, then the batch mean.

    Args:
        model_err_w: ``[B]`` trained model's per-sample MSE on the winners (m_w).
        model_err_l: ``[B]`` trained model's per-sample MSE on the losers (m_l).
        ref_err_w: ``[B]`` reference's per-sample MSE on the winners (r_w); no gradient needed.
        ref_err_l: ``[B]`` reference's per-sample MSE on the losers (r_l).
        beta: β >= 0 in Diffusion-DPO's reference convention (5000 for SD1.5/SDXL; the 0.5 is
            applied here).
        weights: ``[B]`` per-pair credit weights w (``TimestepSampler`` in weighted mode), or
            ``None`` for w = 1.
        winner_anchor: λ >= 0 of DPO-Positive (Pal et al. 2024, arXiv:2402.13228), carried
            over to diffusion: ``λ · max(0, D^w)`` joins the winner's side of the logit, so the
            loss also rises when the model denoises the *winner* worse than the reference does.
            Plain DPO only sees the difference D^w - D^l and can lower it by making both
            images worse ("likelihood displacement"); 0 (the default) is plain DPO.
        loss_scale: ``[B]`` factors on each pair's loss, outside the log-sigmoid (``1 / W`` in
            the ``"importance-corrected"`` timestep mode), or ``None`` for 1.

    Returns:
        :class:`PreferenceLossOutput` with ``loss = mean_i -logsigmoid(-(β/2) w_i
        ((m_w - m_l) - (r_w - r_l) + λ max(0, m_w - r_w))_i)``.
    """
    if not (math.isfinite(beta) and beta >= 0):
        raise ValueError(f"beta must be finite and >= 0, got {beta!r}")
    if not (math.isfinite(winner_anchor) and winner_anchor >= 0):
        raise ValueError(f"winner_anchor must be finite and >= 0, got {winner_anchor!r}")
    errs = (model_err_w, model_err_l, ref_err_w, ref_err_l)
    shape = model_err_w.shape
    if model_err_w.ndim != 1 or any(e.shape != shape for e in errs):
        raise ValueError(
            "model_err_w, model_err_l, ref_err_w and ref_err_l must all be [B]; got "
            + ", ".join(str(tuple(e.shape)) for e in errs)
        )
    if shape[0] < 1:
        raise ValueError("the batch is empty")
    if weights is not None and weights.shape != shape:
        raise ValueError(f"weights must be [B] = {tuple(shape)}, got {tuple(weights.shape)}")

    dtype = torch.float32
    for e in errs:
        dtype = torch.promote_types(dtype, e.dtype)
    m_w, m_l, r_w, r_l = (e.to(dtype) for e in errs)

    d_w = m_w - r_w  # D^w: how much worse than the reference the model is on the winner
    d_l = m_l - r_l
    inside = d_w - d_l
    if winner_anchor:
        inside = inside + winner_anchor * torch.clamp(d_w, min=0.0)
    logits = -0.5 * beta * inside
    if weights is not None:
        logits = logits * weights.to(device=logits.device, dtype=dtype)
    per_sample = -F.logsigmoid(logits)
    if loss_scale is not None:
        if loss_scale.shape != shape:
            raise ValueError(
                f"loss_scale must be [B] = {tuple(shape)}, got {tuple(loss_scale.shape)}"
            )
        per_sample = per_sample * loss_scale.to(device=per_sample.device, dtype=dtype)

    with torch.no_grad():
        implicit_acc = (d_w < d_l).to(dtype).mean()
        reward_margin = logits.detach().mean()
        model_mse = 0.5 * (m_w.detach().mean() + m_l.detach().mean())
        ref_mse = 0.5 * (r_w.detach().mean() + r_l.detach().mean())

    return PreferenceLossOutput(
        loss=per_sample.mean(),
        per_sample_loss=per_sample,
        implicit_acc=implicit_acc,
        reward_margin=reward_margin,
        model_mse=model_mse,
        ref_mse=ref_mse,
    )


def pair_losses(
    model_err: torch.Tensor,
    ref_err: torch.Tensor,
    *,
    beta: float,
    weights: torch.Tensor | None = None,
    ties: torch.Tensor | None = None,
    winner_anchor: float = 0.0,
    loss_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, PreferenceLossOutput]:
    """The loss of a micro-batch of B pairs from the per-sample errors on [winners; losers].

    Args:
        model_err: ``[2B]`` the policy's per-sample MSE, winners first then losers.
        ref_err: ``[2B]`` the reference's, same order.
        beta: β (Diffusion-DPO's reference convention).
        weights: ``[B]`` credit weights, or None.
        ties: ``[B]`` bool, pairs labelled as ties. A tie's loss is the symmetric
            ``0.5 (-log σ(z) - log σ(-z))``, which is minimised when the two implicit rewards
            are equal; decided pairs get ``-log σ(z)``.
        winner_anchor: DPO-Positive's λ (:func:`preference_loss`); for a tie it anchors each
            image in its own ordering.
        loss_scale: ``[B]`` factors on each pair's loss (:func:`preference_loss`).

    Returns:
        ``(loss, output)``: the scalar loss to backpropagate (mean over pairs) and the
        :class:`PreferenceLossOutput` of the winner-vs-loser ordering (for its diagnostics).
    """
    b = model_err.shape[0] // 2
    if model_err.shape != ref_err.shape or model_err.shape[0] != 2 * b or b < 1:
        raise ValueError(
            f"expected [2B] errors, got {tuple(model_err.shape)} and {tuple(ref_err.shape)}"
        )
    out = preference_loss(
        model_err[:b],
        model_err[b:],
        ref_err[:b],
        ref_err[b:],
        beta=beta,
        weights=weights,
        winner_anchor=winner_anchor,
        loss_scale=loss_scale,
    )
    if ties is None or not bool(ties.any()):
        return out.loss, out
    swapped = preference_loss(
        model_err[b:],
        model_err[:b],
        ref_err[b:],
        ref_err[:b],
        beta=beta,
        weights=weights,
        winner_anchor=winner_anchor,
        loss_scale=loss_scale,
    )
    ties = ties.to(device=out.per_sample_loss.device, dtype=torch.bool)
    per = torch.where(
        ties, 0.5 * (out.per_sample_loss + swapped.per_sample_loss), out.per_sample_loss
    )
    return per.mean(), out
