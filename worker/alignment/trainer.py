"""DDE / Diffusion-DPO preference training of a :class:`Backbone`, on accelerate.

:func:`train` runs one training round on a list of :class:`PreferencePair` and writes the result
(a LoRA adapter, or the full UNet weights) atomically into ``output_dir``. The same code runs in
one process or under ``accelerate launch`` on several GPUs: the model, optimizer, dataloader and
learning-rate schedule go through ``Accelerator.prepare``, gradient accumulation through
``Accelerator.accumulate``, mixed precision through ``Accelerator(mixed_precision=...)``.

Per pair (docs/dde.md): one timestep k (from :class:`~worker.alignment.credit.TimestepSampler`)
and one noise ε shared by the winner and the loser; the policy runs on the batch [winners;
losers]; the reference runs on the same inputs under ``no_grad`` (LoRA: the same UNet with its
adapters disabled; full fine-tune: a frozen copy); the loss is
:func:`~worker.alignment.losses.preference_loss` on the per-sample MSEs.

Reproducibility: every random draw of a pair (its timestep, ε, and the VAE's latent sample)
comes from a generator seeded by (seed, the pair's position in the data stream), and the data
order of each epoch from (seed, epoch). So a run is a function of (seed, data, config): two runs
give the same adapter, a run resumed from a checkpoint ends where the unbroken run ends, and
``batch_size=2, grad_accum=1`` equals ``batch_size=1, grad_accum=2`` up to float rounding.

Safety: a non-finite loss or gradient, or a loss above ``loss_spike_factor`` x the running median
for ``max_consecutive_spikes`` steps in a row, stops the run with :class:`TrainingDiverged`;
``should_stop()`` stops it with :class:`TrainingCancelled`. Neither writes the final adapter, and
the final adapter of a previous attempt is removed when a run starts, so a file at
``TrainResult.adapter_path`` always comes from a run that finished.

Nothing here imports from the web or database layers.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from worker.alignment.adapters import (
    adapters_disabled,
    add_lora,
    atomic_save_safetensors,
    file_sha256,
    has_adapter,
    prepare_full_finetune,
    read_adapter_file,
    save_adapter,
    save_full_weights,
    unwrap_model,
)
from worker.alignment.backbone import Backbone, Conditioning
from worker.alignment.config import TrainConfig
from worker.alignment.credit import CreditParams, TimestepSampler
from worker.alignment.losses import (
    PreferenceLossOutput,
    epsilon_error_scale,
    per_sample_mse,
    preference_loss,
)

__all__ = [
    "ADAPTER_FILENAME",
    "CHECKPOINT_DIRNAME",
    "FULL_WEIGHTS_FILENAME",
    "LossSpikeGuard",
    "PreferencePair",
    "ResumeMismatchError",
    "StepMetrics",
    "TrainResult",
    "TrainingCancelled",
    "TrainingDiverged",
    "image_to_tensor",
    "latest_checkpoint",
    "pair_losses",
    "train",
]

logger = logging.getLogger(__name__)

ADAPTER_FILENAME = "adapter.safetensors"
FULL_WEIGHTS_FILENAME = "unet.safetensors"
CHECKPOINT_DIRNAME = "checkpoints"
_CKPT_RE = re.compile(r"^step-(\d+)$")
_SEED_TAG_ORDER = 1
_SEED_TAG_PAIR = 2
_SEED_TAG_LOADER = 3

# np.ndarray uint8 [H, W, 3] | PIL.Image.Image | torch.Tensor float [3, H, W] in [-1, 1]
ImageLike = Any


# ============================================================================ data types
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
class TrainResult:
    """A finished run.

    Attributes:
        adapter_path: the LoRA adapter (``adapter.safetensors``) or, for ``finetune="full"``,
            the UNet weights (``unet.safetensors``), in ``output_dir``.
        adapter_sha256: hex SHA-256 of that file.
        steps: optimizer steps trained in total (including those before a resume).
        history: one :class:`StepMetrics` per step.
        final: the last step's metrics.
        finetune: ``"lora"`` or ``"full"``.
        resumed_from: the checkpoint step this run resumed from, or None.
        pairs_used: number of pairs trained on (ties dropped unless included).
    """

    adapter_path: Path
    adapter_sha256: str
    steps: int
    history: list[StepMetrics]
    final: StepMetrics
    finetune: str
    resumed_from: int | None = None
    pairs_used: int = 0


class TrainingDiverged(RuntimeError):
    """The run was stopped because it diverged; no adapter was written."""

    def __init__(self, step: int, reason: str, metrics: StepMetrics | None = None) -> None:
        super().__init__(f"training diverged at step {step}: {reason}")
        self.step = step
        self.reason = reason
        self.metrics = metrics


class TrainingCancelled(RuntimeError):
    """``should_stop()`` asked the run to stop; no adapter was written."""

    def __init__(self, step: int) -> None:
        super().__init__(f"training cancelled after step {step}")
        self.step = step


class ResumeMismatchError(ValueError):
    """The checkpoint in ``output_dir`` was written by a run with other data or settings."""


# ============================================================================ images
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


# ============================================================================ losses
def pair_losses(
    model_err: torch.Tensor,
    ref_err: torch.Tensor,
    *,
    beta: float,
    weights: torch.Tensor | None = None,
    ties: torch.Tensor | None = None,
    winner_anchor: float = 0.0,
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
    )
    ties = ties.to(device=out.per_sample_loss.device, dtype=torch.bool)
    per = torch.where(
        ties, 0.5 * (out.per_sample_loss + swapped.per_sample_loss), out.per_sample_loss
    )
    return per.mean(), out


# ============================================================================ data
def _derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, via numpy's SeedSequence (no collisions between tuples)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))


class _PairDataset(Dataset):
    """Items are looked up by ``(pair index, stream position)``; images converted lazily."""

    def __init__(self, pairs: Sequence[PreferencePair], resolution: int) -> None:
        self.pairs = pairs
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, position = key
        pair = self.pairs[index]
        return {
            "prompt": pair.prompt,
            "winner": image_to_tensor(pair.winner, self.resolution),
            "loser": image_to_tensor(pair.loser, self.resolution),
            "tie": bool(pair.tie),
            "position": int(position),
        }


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "prompt": [it["prompt"] for it in items],
        "winner": torch.stack([it["winner"] for it in items]),
        "loser": torch.stack([it["loser"] for it in items]),
        "tie": torch.tensor([it["tie"] for it in items], dtype=torch.bool),
        "position": torch.tensor([it["position"] for it in items], dtype=torch.long),
    }


class _SeededEpochSampler(Sampler):
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
        g = torch.Generator().manual_seed(_derive_seed(self.seed, _SEED_TAG_ORDER, self.epoch))
        perm = torch.randperm(self.n, generator=g).tolist()
        base = self.epoch * self.n
        for rank, index in enumerate(perm):
            yield index, base + rank


def _data_fingerprint(pairs: Sequence[PreferencePair]) -> str:
    import hashlib

    h = hashlib.sha256()
    h.update(str(len(pairs)).encode())
    for p in pairs:
        h.update(b"\x00" + p.prompt.encode("utf-8") + (b"\x01" if p.tie else b"\x02"))
    return h.hexdigest()


# ============================================================================ run state
@dataclass
class LossSpikeGuard:
    """Flags a run whose loss stays far above its recent typical value.

    A loss above ``factor`` x the median of the last ``window`` accepted losses is a spike
    (checked once ``min_history`` losses are known; spikes do not enter the history). After
    ``max_consecutive`` spikes in a row, :meth:`observe` returns the reason to stop.
    ``factor=None`` disables the check. Non-finite losses are the trainer's business: they stop a
    run at once.

    A run that is bad *from the start* has no good history to spike against, so there is also a
    ceiling: every DPO-family loss starts at ``ln 2 ≈ 0.693`` (the model equals its reference),
    and a run that learns the preferences brings it down. Once ``min_history`` losses are known,
    a running median above ``ceiling`` means the model is moving *against* the preferences
    (typically a learning rate or β far too large), and :meth:`observe` returns the reason to
    stop. ``ceiling=None`` disables it.
    """

    factor: float | None
    window: int
    min_history: int
    max_consecutive: int
    ceiling: float | None = None
    recent: list[float] = field(default_factory=list)
    consecutive: int = 0

    @classmethod
    def from_config(cls, config: TrainConfig) -> LossSpikeGuard:
        return cls(
            config.loss_spike_factor,
            config.spike_window,
            config.spike_min_history,
            config.max_consecutive_spikes,
            config.max_median_loss,
        )

    def observe(self, loss: float) -> str | None:
        """Records one step's loss; returns why the run must stop, or None."""
        reason = self._observe_spike(loss)
        if reason is None and self.ceiling is not None and len(self.recent) >= self.min_history:
            median = statistics.median(self.recent)
            if median > self.ceiling:
                return (
                    f"the running median loss {median:.4g} is above {self.ceiling:g} (it starts "
                    f"at ln 2 = 0.693 and should fall): the model is moving against the "
                    f"preferences; lower the learning rate or beta"
                )
        return reason

    def _observe_spike(self, loss: float) -> str | None:
        if self.factor is not None and len(self.recent) >= self.min_history:
            median = statistics.median(self.recent)
            if median > 0 and loss > self.factor * median:
                self.consecutive += 1
                if self.consecutive >= self.max_consecutive:
                    return (
                        f"loss {loss:.4g} above {self.factor:g} x the running median "
                        f"{median:.4g} for {self.consecutive} consecutive steps"
                    )
                return None
        self.consecutive = 0
        self.recent = (self.recent + [float(loss)])[-self.window :]
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"recent": list(self.recent), "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.recent = [float(x) for x in state["recent"]][-self.window :]
        self.consecutive = int(state["consecutive"])


@dataclass
class _RunState:
    step: int = 0
    position: int = 0  # micro-batches consumed from the data stream (per process)
    history: list[StepMetrics] = field(default_factory=list)
    guard: dict[str, Any] = field(default_factory=dict)
    consecutive_skips: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "position": self.position,
            "history": [m.as_dict() for m in self.history],
            "guard": self.guard,
            "consecutive_skips": self.consecutive_skips,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> _RunState:
        return cls(
            step=int(data["step"]),
            position=int(data["position"]),
            history=[StepMetrics(**m) for m in data["history"]],
            guard=dict(data["guard"]),
            consecutive_skips=int(data["consecutive_skips"]),
        )


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            npst["keys"].numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint directory under ``output_dir/checkpoints``, or None."""
    root = Path(output_dir) / CHECKPOINT_DIRNAME
    if not root.is_dir():
        return None
    best: tuple[int, Path] | None = None
    for child in root.iterdir():
        m = _CKPT_RE.match(child.name)
        if m and (child / "state.json").is_file():
            step = int(m.group(1))
            if best is None or step > best[0]:
                best = (step, child)
    return best[1] if best else None


def _fsync_tree(path: Path) -> None:
    for child in path.iterdir():
        if child.is_file():
            with open(child, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ============================================================================ the trainer
class _Trainer:
    def __init__(
        self,
        backbone: Backbone,
        pairs: Sequence[PreferencePair],
        config: TrainConfig,
        output_dir: Path,
        progress: Callable[[StepMetrics], None] | None,
        should_stop: Callable[[], bool] | None,
        resume: bool,
        progress_bar: bool | None,
    ) -> None:
        self.backbone = backbone
        self.config = config
        self.output_dir = output_dir
        self.progress = progress
        self.should_stop = should_stop
        self.resume = resume
        self.progress_bar = progress_bar
        self.all_pairs = list(pairs)
        self.pairs = [p for p in self.all_pairs if config.include_ties or not p.tie]
        dropped = len(self.all_pairs) - len(self.pairs)
        if not self.pairs:
            raise ValueError(
                f"no pairs to train on ({len(self.all_pairs)} given, {dropped} ties dropped; "
                "set include_ties=True to train on ties)"
            )
        if dropped:
            logger.info("dropped %d tied pairs (include_ties=False)", dropped)

    # ---------------------------------------------------------------- setup
    def _setup(self) -> None:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState, GradientState
        from accelerate.utils import GradientAccumulationPlugin, set_seed
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import cast_training_params

        cfg = self.config
        bb = self.backbone
        # accelerate keeps its state in process-wide singletons; a worker process runs many
        # rounds, possibly with different mixed_precision settings, so start each round fresh.
        # (PartialState, which holds the distributed process group, is kept.)
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
        self.accelerator = acc = Accelerator(
            mixed_precision=cfg.mixed_precision,
            gradient_accumulation_plugin=GradientAccumulationPlugin(
                num_steps=cfg.grad_accum, sync_with_dataloader=False
            ),
        )
        set_seed(cfg.seed)

        self.resolution = cfg.resolution or bb.resolution
        vae_factor = 1 if bb.vae is None else 2 ** (len(bb.vae.config.block_out_channels) - 1)
        unet_cfg = getattr(unwrap_model(bb.unet), "config", None)
        unet_factor = 2 ** (len(unet_cfg.block_out_channels) - 1) if unet_cfg is not None else 1
        if self.resolution % (vae_factor * unet_factor):
            raise ValueError(
                f"resolution {self.resolution} must be a multiple of {vae_factor * unet_factor} "
                "for this model"
            )
        self._saved_resolution = bb.resolution
        bb.resolution = self.resolution

        # ---- what is trained, and the reference
        self.reference: nn.Module | None = None
        unet = unwrap_model(bb.unet)
        if cfg.finetune == "lora":
            if has_adapter(unet):
                for name, p in unet.named_parameters():
                    p.requires_grad_(".lora_" in name)
            else:
                add_lora(
                    unet,
                    rank=cfg.lora_rank,
                    alpha=cfg.lora_alpha,
                    target_modules=cfg.lora_target_modules,
                    dropout=cfg.lora_dropout,
                )
        else:
            self.reference = prepare_full_finetune(bb)

        weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
            cfg.mixed_precision
        ]
        bb.to(acc.device)
        for module in (bb.text_encoder, bb.text_encoder_2):
            if module is not None:
                module.to(dtype=weight_dtype)
        if bb.vae is not None and weight_dtype == torch.bfloat16:
            # As diffusers' DPO example: the frozen VAE encodes in bf16. Under fp16 it stays
            # float32, because the SDXL VAE overflows in fp16.
            bb.vae.to(dtype=weight_dtype)
        if cfg.finetune == "lora" and weight_dtype != torch.float32:
            # frozen base weights in the compute dtype, trained adapter weights in float32
            unet.to(dtype=weight_dtype)
            cast_training_params(unet, dtype=torch.float32)
        elif self.reference is not None:
            self.reference.to(device=acc.device, dtype=weight_dtype)
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()

        self.trainable_names = [n for n, p in unet.named_parameters() if p.requires_grad]
        params = [p for p in unet.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the UNet has no trainable parameters")
        if cfg.optimizer == "adamw":
            optimizer: torch.optim.Optimizer = torch.optim.AdamW(
                params,
                lr=cfg.learning_rate,
                betas=(cfg.adam_beta1, cfg.adam_beta2),
                weight_decay=cfg.adam_weight_decay,
                eps=cfg.adam_epsilon,
            )
        else:
            from transformers.optimization import Adafactor

            optimizer = Adafactor(
                params,
                lr=cfg.learning_rate,
                weight_decay=cfg.adam_weight_decay,
                scale_parameter=False,
                relative_step=False,
                warmup_init=False,
            )
        lr_scheduler = get_scheduler(
            "constant_with_warmup",
            optimizer=optimizer,
            num_warmup_steps=cfg.lr_warmup_steps * acc.num_processes,
        )

        self.sampler = _SeededEpochSampler(len(self.pairs), cfg.seed)
        dataloader = DataLoader(
            _PairDataset(self.pairs, self.resolution),
            batch_size=cfg.batch_size,
            sampler=self.sampler,
            collate_fn=_collate,
            drop_last=False,
            num_workers=0,
            # its own generator: creating an iterator then draws no seed from the global torch
            # RNG, whose state (LoRA dropout) checkpoints restore exactly
            generator=torch.Generator().manual_seed(_derive_seed(cfg.seed, _SEED_TAG_LOADER)),
        )
        self.model, self.optimizer, self.dataloader, self.lr_scheduler = acc.prepare(
            unet, optimizer, dataloader, lr_scheduler
        )
        self.params = params
        self._unet = unet

        self.timestep_sampler = TimestepSampler(
            cfg.scheme,
            bb.alphas_cumprod,
            mode=cfg.timestep_mode,  # type: ignore[arg-type]
            params=CreditParams(tau_center=cfg.tau_center, tau_halfwidth=cfg.tau_halfwidth),
        )
        self.prediction_type = getattr(bb.scheduler.config, "prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r}")
        self.alphas_cumprod = bb.alphas_cumprod
        self.latent_shape = (
            bb.latent_channels,
            self.resolution // vae_factor,
            self.resolution // vae_factor,
        )
        self.fingerprint = _data_fingerprint(self.pairs)

    def _teardown(self) -> None:
        from accelerate.state import AcceleratorState, GradientState

        bb = self.backbone
        acc = getattr(self, "accelerator", None)
        if acc is not None and getattr(self, "model", None) is not None:
            # drop accelerate's autocast patch on forward and any DDP wrapper
            bb.unet = acc.unwrap_model(self.model, keep_fp32_wrapper=False)
        unwrap_model(bb.unet).eval()
        if hasattr(self, "_saved_resolution"):
            bb.resolution = self._saved_resolution
        if acc is not None:
            acc.free_memory()
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()

    # ---------------------------------------------------------------- one micro-batch
    def _micro_batch(
        self, batch: dict[str, Any]
    ) -> tuple[torch.Tensor, PreferenceLossOutput, torch.Tensor]:
        cfg = self.config
        bb = self.backbone
        acc = self.accelerator
        device = acc.device
        prompts: list[str] = batch["prompt"]
        gens = [
            torch.Generator().manual_seed(_derive_seed(cfg.seed, _SEED_TAG_PAIR, int(pos)))
            for pos in batch["position"].tolist()
        ]
        # per pair, in this order: timestep, noise, VAE sample of the winner, of the loser
        draws = [self.timestep_sampler.sample(1, g) for g in gens]
        timesteps = torch.cat([d[0] for d in draws]).to(device)
        weights = torch.cat([d[1] for d in draws]).to(device)
        noise = torch.stack([torch.randn(self.latent_shape, generator=g) for g in gens])

        with torch.no_grad():
            images = torch.cat([batch["winner"], batch["loser"]]).to(device)
            latents = bb.images_to_latents(images, generator=gens + gens)
            noise2 = torch.cat([noise, noise]).to(device=device, dtype=latents.dtype)
            t2 = torch.cat([timesteps, timesteps])
            noisy = bb.scheduler.add_noise(latents, noise2, t2)
            if self.prediction_type == "epsilon":
                target = noise2
            elif self.prediction_type == "v_prediction":
                target = bb.scheduler.get_velocity(latents, noise2, t2)
            else:
                target = latents
            cond: Conditioning = bb.encode_prompts(prompts).repeat(2)
            with acc.autocast():
                if self.reference is None:
                    with adapters_disabled(self.model) as base:
                        ref_pred = bb.predict_noise(noisy, t2, cond, unet=base)
                else:
                    ref_pred = bb.predict_noise(noisy, t2, cond, unet=self.reference)
            # D is in ε-prediction units whatever the UNet predicts (docs/dde.md defines it on
            # ‖ε - ε_θ‖²): ᾱ_t x the v-MSE for v-prediction, SNR_t x the x_0-MSE for "sample".
            to_eps = epsilon_error_scale(self.alphas_cumprod, t2, self.prediction_type)
            ref_err = per_sample_mse(ref_pred.float(), target.float()) * to_eps

        with acc.autocast():
            model_pred = bb.predict_noise(noisy, t2, cond, unet=self.model)
        model_err = per_sample_mse(model_pred.float(), target.float()) * to_eps
        loss, out = pair_losses(
            model_err,
            ref_err,
            beta=cfg.beta,
            weights=weights if cfg.timestep_mode == "weighted" else None,
            ties=batch["tie"].to(device),
            winner_anchor=cfg.winner_anchor,
        )
        return loss, out, timesteps

    # ---------------------------------------------------------------- data stream
    def _stream(self, start_position: int) -> Iterator[dict[str, Any]]:
        per_epoch = len(self.dataloader)
        epoch, offset = divmod(start_position, per_epoch)
        while True:
            self.sampler.set_stream_epoch(epoch)
            loader = (
                self.accelerator.skip_first_batches(self.dataloader, offset)
                if offset
                else self.dataloader
            )
            yield from loader
            epoch += 1
            offset = 0

    # ---------------------------------------------------------------- checkpoints
    def _resume_compatible(self, saved: dict[str, Any]) -> None:
        cfg = self.config.to_dict()
        old = saved["config"]
        for key in sorted(set(cfg) | set(old)):
            if key in TrainConfig.RESUMABLE_FIELDS:
                continue
            if cfg.get(key) != old.get(key):
                raise ResumeMismatchError(
                    f"the checkpoint in {self.output_dir} was written with {key}={old.get(key)!r}, "
                    f"this run has {key}={cfg.get(key)!r}; use another output_dir or resume=False"
                )
        if saved["data_fingerprint"] != self.fingerprint:
            raise ResumeMismatchError(
                f"the checkpoint in {self.output_dir} was trained on other pairs; use another "
                "output_dir or resume=False"
            )
        if saved["num_processes"] != self.accelerator.num_processes:
            raise ResumeMismatchError(
                f"the checkpoint was written by {saved['num_processes']} processes, this run has "
                f"{self.accelerator.num_processes}"
            )

    def _save_checkpoint(self, state: _RunState) -> None:
        acc = self.accelerator
        root = self.output_dir / CHECKPOINT_DIRNAME
        final = root / f"step-{state.step:06d}"
        tmp = root / f".tmp-step-{state.step:06d}"
        if acc.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        acc.wait_for_everyone()
        torch.save(_rng_state(), tmp / f"rng-{acc.process_index}.pt")
        acc.wait_for_everyone()
        if acc.is_main_process:
            named = dict(self._unet.named_parameters())
            atomic_save_safetensors(
                {n: named[n] for n in self.trainable_names}, tmp / "trainable.safetensors"
            )
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(self.lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
            if acc.scaler is not None:
                torch.save(acc.scaler.state_dict(), tmp / "scaler.pt")
            meta = {
                "state": state.to_json(),
                "config": self.config.to_dict(),
                "data_fingerprint": self.fingerprint,
                "num_processes": acc.num_processes,
                "finetune": self.config.finetune,
            }
            (tmp / "state.json").write_text(json.dumps(meta))
            _fsync_tree(tmp)
            if final.exists():
                trash = root / f".old-step-{state.step:06d}"
                shutil.rmtree(trash, ignore_errors=True)
                os.replace(final, trash)
                os.replace(tmp, final)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(tmp, final)
            fd = os.open(root, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            self._prune_checkpoints(root)
        acc.wait_for_everyone()

    def _prune_checkpoints(self, root: Path) -> None:
        steps = sorted(
            (int(m.group(1)), child)
            for child in root.iterdir()
            if (m := _CKPT_RE.match(child.name)) and (child / "state.json").is_file()
        )
        for _, child in steps[: max(0, len(steps) - self.config.keep_checkpoints)]:
            shutil.rmtree(child, ignore_errors=True)

    def _load_checkpoint(self, path: Path) -> _RunState:
        acc = self.accelerator
        meta = json.loads((path / "state.json").read_text())
        self._resume_compatible(meta)
        tensors, _ = read_adapter_file(path / "trainable.safetensors")
        if set(tensors) != set(self.trainable_names):
            raise ResumeMismatchError(
                f"checkpoint {path} holds other trainable parameters than this model "
                f"({len(tensors)} vs {len(self.trainable_names)})"
            )
        named = dict(self._unet.named_parameters())
        with torch.no_grad():
            for name, value in tensors.items():
                named[name].copy_(value.to(named[name].dtype))
        self.optimizer.load_state_dict(
            torch.load(path / "optimizer.pt", map_location=acc.device, weights_only=True)
        )
        self.lr_scheduler.load_state_dict(torch.load(path / "lr_scheduler.pt", weights_only=True))
        if acc.scaler is not None and (path / "scaler.pt").is_file():
            acc.scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
        rng_file = path / f"rng-{acc.process_index}.pt"
        if rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=True))
        state = _RunState.from_json(meta["state"])
        if state.step > self.config.steps:
            raise ResumeMismatchError(
                f"checkpoint {path} is at step {state.step}, past steps={self.config.steps}"
            )
        return state

    # ---------------------------------------------------------------- the loop
    def run(self) -> TrainResult:
        try:
            self._setup()
            return self._run()
        finally:
            self._teardown()

    def _run(self) -> TrainResult:
        from accelerate.utils import broadcast

        cfg = self.config
        acc = self.accelerator
        final_name = ADAPTER_FILENAME if cfg.finetune == "lora" else FULL_WEIGHTS_FILENAME
        final_path = self.output_dir / final_name
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            # a file at the final path must come from a run that finished: remove a stale one
            for name in (ADAPTER_FILENAME, FULL_WEIGHTS_FILENAME):
                (self.output_dir / name).unlink(missing_ok=True)
            if not self.resume:
                shutil.rmtree(self.output_dir / CHECKPOINT_DIRNAME, ignore_errors=True)
        acc.wait_for_everyone()

        state = _RunState()
        self.guard = LossSpikeGuard.from_config(cfg)
        resumed_from: int | None = None
        ckpt = latest_checkpoint(self.output_dir) if self.resume else None
        if ckpt is not None:
            state = self._load_checkpoint(ckpt)
            if state.guard:
                self.guard.load_state_dict(state.guard)
            resumed_from = state.step
            logger.info("resumed from %s (step %d)", ckpt, state.step)

        show_bar = self.progress_bar
        if show_bar is None:
            show_bar = self.progress is None and sys.stdout.isatty()
        bar = None
        if show_bar and acc.is_main_process:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=state.step, desc="train", unit="step")

        stream = self._stream(state.position)
        try:
            while state.step < cfg.steps:
                if self.should_stop is not None:
                    flag = torch.tensor(
                        [1 if (acc.is_main_process and self.should_stop()) else 0],
                        device=acc.device,
                    )
                    if int(broadcast(flag).item()):
                        raise TrainingCancelled(state.step)
                metrics = self._train_step(state, stream)
                state.history.append(metrics)
                if cfg.checkpoint_every and (
                    state.step % cfg.checkpoint_every == 0 or state.step == cfg.steps
                ):
                    self._save_checkpoint(state)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{metrics.loss:.4f}", acc=f"{metrics.implicit_acc:.2f}")
                if (
                    self.progress is not None
                    and acc.is_main_process
                    and (state.step % cfg.log_every == 0 or state.step == cfg.steps)
                ):
                    self.progress(metrics)
        finally:
            if bar is not None:
                bar.close()

        for name, p in self._unet.named_parameters():
            if p.requires_grad and not torch.isfinite(p).all():
                raise TrainingDiverged(state.step, f"non-finite weights in {name}")
        acc.wait_for_everyone()
        sha = ""
        if acc.is_main_process:
            header = {
                "scheme": cfg.scheme,
                "steps": str(state.step),
                "seed": str(cfg.seed),
                "base_model": self.backbone.name,
                "train_config": json.dumps(cfg.to_dict(), sort_keys=True),
            }
            if cfg.finetune == "lora":
                sha = save_adapter(self._unet, final_path, metadata=header)
            else:
                sha = save_full_weights(self._unet, final_path, metadata=header)
        acc.wait_for_everyone()
        if not sha:
            sha = file_sha256(final_path)
        if not state.history:
            raise RuntimeError("no step was trained")  # steps >= 1 is validated; defensive
        return TrainResult(
            adapter_path=final_path,
            adapter_sha256=sha,
            steps=state.step,
            history=state.history,
            final=state.history[-1],
            finetune=cfg.finetune,
            resumed_from=resumed_from,
            pairs_used=len(self.pairs),
        )

    def _train_step(self, state: _RunState, stream: Iterator[dict[str, Any]]) -> StepMetrics:
        cfg = self.config
        acc = self.accelerator
        started = time.perf_counter()
        lr = float(self.lr_scheduler.get_last_lr()[0])
        sums = torch.zeros(5, device=acc.device, dtype=torch.float64)
        all_timesteps: list[torch.Tensor] = []
        grad_norm = float("nan")
        skipped = False
        step_number = state.step + 1
        for micro in range(cfg.grad_accum):
            batch = next(stream)
            state.position += 1
            with acc.accumulate(self.model):
                loss, out, timesteps = self._micro_batch(batch)
                diag = torch.stack(
                    [loss.detach(), out.implicit_acc, out.reward_margin, out.model_mse, out.ref_mse]
                ).to(torch.float64)
                diag = acc.reduce(diag, reduction="mean")
                if not torch.isfinite(diag[0]):
                    raise TrainingDiverged(step_number, f"non-finite loss ({diag[0].item()})")
                sums += diag
                all_timesteps.append(acc.gather(timesteps))
                acc.backward(loss)
                if micro == cfg.grad_accum - 1 and not acc.sync_gradients:
                    raise RuntimeError("gradient accumulation out of step with the data stream")
                if acc.sync_gradients:
                    max_norm = cfg.max_grad_norm if cfg.max_grad_norm is not None else math.inf
                    norm = acc.clip_grad_norm_(self.params, max_norm)
                    grad_norm = float(norm) if norm is not None else float("nan")
                    if not math.isfinite(grad_norm):
                        if cfg.mixed_precision != "fp16":
                            raise TrainingDiverged(
                                step_number, f"non-finite gradient norm ({grad_norm})"
                            )
                        # fp16: the grad scaler skips this update and lowers its scale
                        skipped = True
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
        if skipped or acc.optimizer_step_was_skipped:
            state.consecutive_skips += 1
            if state.consecutive_skips >= cfg.max_consecutive_spikes:
                raise TrainingDiverged(
                    step_number,
                    f"{state.consecutive_skips} consecutive steps skipped for overflowing fp16 gradients",
                )
        else:
            state.consecutive_skips = 0
        means = (sums / cfg.grad_accum).tolist()
        counts, _ = self.timestep_sampler.histogram(
            torch.cat(all_timesteps), bins=cfg.histogram_bins
        )
        metrics = StepMetrics(
            step=step_number,
            total_steps=cfg.steps,
            loss=means[0],
            implicit_acc=means[1],
            reward_margin=means[2],
            model_mse=means[3],
            ref_mse=means[4],
            lr=lr,
            grad_norm=grad_norm,
            timestep_histogram=[int(c) for c in counts],
            seconds=time.perf_counter() - started,
        )
        reason = self.guard.observe(metrics.loss)
        state.guard = self.guard.state_dict()
        if reason is not None:
            raise TrainingDiverged(step_number, reason, metrics)
        state.step = step_number
        return metrics


def train(
    backbone: Backbone,
    pairs: Sequence[PreferencePair],
    config: TrainConfig,
    *,
    output_dir: str | Path,
    progress: Callable[[StepMetrics], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    resume: bool = True,
    progress_bar: bool | None = None,
) -> TrainResult:
    """Aligns ``backbone`` to ``pairs`` with DDE (or the configured credit scheme).

    Args:
        backbone: the model. For ``finetune="lora"`` a LoRA adapter is added (after seeding) unless
            the UNet already carries one, which is then trained; the reference is the UNet with
            adapters disabled. For ``"full"`` the reference is a frozen copy of the UNet. The
            backbone is trained in place and moved to the accelerator's device; under mixed
            precision its frozen weights are cast to fp16/bf16.
        pairs: the preference pairs (ties dropped unless ``config.include_ties``).
        config: the run's settings.
        output_dir: working directory of the run: ``checkpoints/step-NNNNNN`` and, at the end,
            ``adapter.safetensors`` (or ``unet.safetensors``), each written atomically.
        progress: called on the main process with each step's :class:`StepMetrics` (every
            ``config.log_every`` steps and at the last).
        should_stop: polled before every step; True stops the run with
            :class:`TrainingCancelled`.
        resume: continue from the latest checkpoint in ``output_dir`` if there is one (it must
            come from the same data and settings, else :class:`ResumeMismatchError`); False
            deletes old checkpoints and starts over.
        progress_bar: show a tqdm bar; None means "when ``progress`` is None and stdout is a tty".

    Returns:
        :class:`TrainResult`.

    Raises:
        TrainingDiverged: non-finite loss/gradient/weights or a sustained loss spike.
        TrainingCancelled: ``should_stop()`` returned True.
        ResumeMismatchError: the checkpoint in ``output_dir`` is from another run.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    trainer = _Trainer(
        backbone,
        pairs,
        config,
        Path(output_dir),
        progress,
        should_stop,
        resume,
        progress_bar,
    )
    return trainer.run()
