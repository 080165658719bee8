"""Held-out evaluation of a training run at fixed timesteps and noise draws.

A round's own training metrics cannot say whether it learned: each step draws one random
timestep and noise per pair, so its implicit accuracy is noisy (0.61-0.79 in runs that beat the
base on every held-out unit, issue 8), and its loss barely moves. :class:`HeldOutSet` fixes the
draws instead. Each held-out pair ``i`` gets ``K`` timesteps ``t_1..t_K`` and one noise ``ε_ij``
per timestep, the same at every evaluation of the run:

- the timesteps are the quantiles ``(j - 1/2) / K`` of the scheme's credit distribution
  ``p(k) = W(k) / Σ W`` (:func:`worker.alignment.credit.credit_distribution`): the deterministic
  counterpart of the importance draws the run trains on, so the held-out loss is the training
  objective of that scheme, measured without sampling noise;
- ``ε_ij`` (and the VAE's latent sample of each image) come from generators seeded by
  ``(seed, i, j)`` (:func:`worker.alignment.data.derive_seed`).

With ``D_ij(x) = ‖ε_ij - ε_θ(x_t, c, t_j)‖² - ‖ε_ij - ε_ref(x_t, c, t_j)‖²`` (a mean over
elements, in ε units, as in training) and ``Δ_i = mean_j [D_ij(x^w) - D_ij(x^l)]``:

- **accuracy** = mean over pairs of ``1[Δ_i < 0] + 0.5 · 1[Δ_i = 0]`` (exactly 0.5 at the
  reference, where every Δ is 0);
- **loss** = mean over pairs of ``-log σ(-β/2 · Δ_i)`` (ln 2 at the reference);
- **drift** = ``Σ ‖ε_θ - ε_ref‖² / Σ ‖ε - ε_ref‖²`` over all held-out images and draws.

Drift is the measure of how far the policy has moved from its reference. For two Gaussian
denoising kernels with the same variance, the KL divergence of one step is proportional to
``‖ε_θ - ε_ref‖²`` (the means differ by a schedule factor times the noise predictions), so the
numerator is, up to the schedule's per-step factors, the path KL between the policy's and the
reference's reverse processes at the credited timesteps, and the denominator measures it in
units of the reference's own denoising error. It is dimensionless, 0 at the reference, and
means the same for a 32-pixel model and for SDXL: 0.1 says that the policy's noise predictions
moved by a tenth of the reference's own error. Unlike the model/ref MSE ratio it cannot hide a
move behind an improvement: any change counts.

The reference's predictions never change during a run, so they are computed once and cached
on the CPU; each evaluation then costs one forward pass of the policy per image and draw.

Nothing here imports from the web or database layers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from worker.alignment.backbone import Backbone, Conditioning
from worker.alignment.credit import CreditParams, credit_distribution
from worker.alignment.data import SEED_TAG_EVAL, PreferencePair, derive_seed, image_to_tensor
from worker.alignment.losses import epsilon_error_scale
from worker.alignment.metrics import EvalMetrics

__all__ = ["HeldOutSet", "Predictor", "fixed_timesteps", "heldout_statistics"]

#: ``(x_t, t, cond) -> the network's raw prediction`` (ε, v or x_0, as the scheduler predicts).
Predictor = Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor]


def fixed_timesteps(
    scheme: str, alphas_cumprod: Any, k: int, params: CreditParams | None = None
) -> torch.Tensor:
    """``[k]`` diffusers timesteps at the quantiles ``(j - 1/2) / k`` of the scheme's credit
    distribution (ascending; duplicates possible when the credit is concentrated)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    cdf = torch.cumsum(credit_distribution(scheme, alphas_cumprod, params), 0)
    qs = (torch.arange(k, dtype=torch.float64) + 0.5) / k
    idx = torch.searchsorted(cdf, qs)
    return idx.clamp_(0, cdf.shape[0] - 1).to(torch.long)


def heldout_statistics(
    model_err: torch.Tensor,
    ref_err: torch.Tensor,
    change: torch.Tensor,
    *,
    beta: float,
) -> dict[str, float]:
    """The held-out figures from per-sample numbers (pure; tested by hand).

    Args:
        model_err: ``[N, K, 2]`` the policy's denoising MSE (ε units) of pair i, draw j, image
            (0 = winner, 1 = loser).
        ref_err: ``[N, K, 2]`` the reference's.
        change: ``[N, K, 2]`` ``‖ε_θ - ε_ref‖²`` (mean over elements, ε units).
        beta: β of the run (Diffusion-DPO's convention: ``-log σ(-β/2 · Δ)``).

    Returns:
        ``accuracy``, ``loss``, ``margin``, ``drift``, ``model_mse``, ``ref_mse`` (see the
        module docstring).
    """
    if not (model_err.shape == ref_err.shape == change.shape) or model_err.dim() != 3:
        raise ValueError("expected three [N, K, 2] tensors of the same shape")
    d = (model_err - ref_err).double()  # D per pair, draw, image
    delta = (d[..., 0] - d[..., 1]).mean(dim=1)  # [N]
    acc = (delta < 0).double() + 0.5 * (delta == 0).double()
    logits = -0.5 * beta * delta
    return {
        "accuracy": float(acc.mean()),
        "loss": float(F.softplus(-logits).mean()),
        "margin": float(logits.mean()),
        "drift": float(change.double().sum() / ref_err.double().sum().clamp_min(1e-30)),
        "model_mse": float(model_err.double().mean()),
        "ref_mse": float(ref_err.double().mean()),
    }


class HeldOutSet:
    """The held-out pairs of a run with their fixed draws (see the module docstring).

    Args:
        backbone: the model (its scheduler, VAE and text encoder are used; the UNet is not).
        pairs: held-out preference pairs; ties are dropped (they have no winner to prefer).
        scheme: the run's credit scheme (the timesteps' distribution).
        k: timesteps (and noise draws) per pair.
        beta: the run's β.
        seed: seed of the draws (the same seed and pairs give the same draws).
        resolution: image side (the run's).
        params: credit settings (τ band).
        batch_size: pairs per forward chunk.
    """

    def __init__(
        self,
        backbone: Backbone,
        pairs: Sequence[PreferencePair],
        *,
        scheme: str,
        k: int,
        beta: float,
        seed: int,
        resolution: int,
        params: CreditParams | None = None,
        batch_size: int = 16,
    ) -> None:
        self.pairs = [p for p in pairs if not p.tie]
        if not self.pairs:
            raise ValueError("no decisive held-out pairs to evaluate on")
        self.backbone = backbone
        self.k = k
        self.beta = beta
        self.seed = seed
        self.resolution = resolution
        self.batch_size = max(1, batch_size)
        self.timesteps = fixed_timesteps(scheme, backbone.alphas_cumprod, k, params)
        self.prediction_type = getattr(backbone.scheduler.config, "prediction_type", "epsilon")
        self._latents: list[torch.Tensor] | None = None
        self._ref: list[torch.Tensor] | None = None  # per chunk: [2*B*K, ...] on the CPU

    def __len__(self) -> int:
        return len(self.pairs)

    # ------------------------------------------------------------------ fixed inputs
    def _chunks(self) -> list[range]:
        n = len(self.pairs)
        return [range(s, min(n, s + self.batch_size)) for s in range(0, n, self.batch_size)]

    def _chunk_inputs(
        self, chunk_index: int, rows: range, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Conditioning]:
        """``(noisy, t, target, noise, cond)`` of a chunk, ordered [pair, draw, image]."""
        bb = self.backbone
        if self._latents is None:
            self._latents = [None] * len(self._chunks())  # type: ignore[list-item]
        if self._latents[chunk_index] is None:
            images = []
            gens = []
            for i in rows:
                p = self.pairs[i]
                images += [
                    image_to_tensor(p.winner, self.resolution),
                    image_to_tensor(p.loser, self.resolution),
                ]
                g = torch.Generator().manual_seed(derive_seed(self.seed, SEED_TAG_EVAL, i))
                gens += [g, g]
            with torch.no_grad():
                lat = bb.images_to_latents(torch.stack(images).to(device), generator=gens)
            self._latents[chunk_index] = lat.float().cpu()
        lat = self._latents[chunk_index]  # [2B, C, H, W]: w0, l0, w1, l1, ...
        shape = tuple(lat.shape[1:])
        noise = torch.stack(
            [
                torch.randn(
                    shape,
                    generator=torch.Generator().manual_seed(
                        derive_seed(self.seed, SEED_TAG_EVAL, i, j + 1)
                    ),
                )
                for i in rows
                for j in range(self.k)
            ]
        )  # [B*K, ...]
        b = len(rows)
        lat_bk2 = lat.view(b, 1, 2, *shape).expand(b, self.k, 2, *shape).reshape(-1, *shape)
        noise_bk2 = (
            noise.view(b, self.k, 1, *shape).expand(b, self.k, 2, *shape).reshape(-1, *shape)
        )
        t = self.timesteps.view(1, self.k, 1).expand(b, self.k, 2).reshape(-1)
        lat_bk2 = lat_bk2.to(device)
        noise_bk2 = noise_bk2.to(device)
        t = t.to(device)
        noisy = bb.scheduler.add_noise(lat_bk2, noise_bk2, t)
        if self.prediction_type == "epsilon":
            target = noise_bk2
        elif self.prediction_type == "v_prediction":
            target = bb.scheduler.get_velocity(lat_bk2, noise_bk2, t)
        else:
            target = lat_bk2
        prompts = [self.pairs[i].prompt for i in rows for _ in range(self.k) for _ in range(2)]
        with torch.no_grad():
            cond = bb.encode_prompts(prompts)
        return noisy, t, target, noise_bk2, cond

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(
        self, policy: Predictor, reference: Predictor, *, step: int, device: torch.device
    ) -> EvalMetrics:
        """Evaluates ``policy`` against ``reference`` (whose predictions are cached after the
        first call) on the fixed draws; see :func:`heldout_statistics`."""
        started = time.perf_counter()
        chunks = self._chunks()
        if self._ref is None:
            self._ref = [None] * len(chunks)  # type: ignore[list-item]
        model_errs, ref_errs, changes = [], [], []
        for ci, rows in enumerate(chunks):
            noisy, t, target, _, cond = self._chunk_inputs(ci, rows, device)
            if self._ref[ci] is None:
                self._ref[ci] = reference(noisy, t, cond).float().cpu()
            ref_pred = self._ref[ci].to(device)
            pred = policy(noisy, t, cond).float()
            scale = epsilon_error_scale(self.backbone.alphas_cumprod, t, self.prediction_type)
            dims = tuple(range(1, pred.dim()))
            tgt = target.float()
            model_errs.append((((pred - tgt) ** 2).mean(dim=dims) * scale).cpu())
            ref_errs.append((((ref_pred - tgt) ** 2).mean(dim=dims) * scale).cpu())
            changes.append((((pred - ref_pred) ** 2).mean(dim=dims) * scale).cpu())
        n = len(self.pairs)
        shape = (n, self.k, 2)
        stats = heldout_statistics(
            torch.cat(model_errs).view(shape),
            torch.cat(ref_errs).view(shape),
            torch.cat(changes).view(shape),
            beta=self.beta,
        )
        for key, value in stats.items():
            if not math.isfinite(value):
                stats[key] = float("nan")
        return EvalMetrics(step=step, pairs=n, seconds=time.perf_counter() - started, **stats)
