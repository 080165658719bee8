"""DDE / Diffusion-DPO preference training of a :class:`Backbone`, on accelerate: the loop.

:func:`train` runs one training round on a list of :class:`PreferencePair` and writes the result
(a LoRA adapter, or the full UNet weights) atomically into ``output_dir``. The same code runs in
one process or under ``accelerate launch`` on several GPUs: the model, optimizer, dataloader and
learning-rate schedule go through ``Accelerator.prepare``, gradient accumulation through
``Accelerator.accumulate``, mixed precision through ``Accelerator(mixed_precision=...)``.

The run's pieces live beside this file:

- :mod:`~worker.alignment.data`: pairs, images, the seeded data stream, the held-out split;
- :mod:`~worker.alignment.losses`: the loss (:func:`~worker.alignment.losses.pair_losses`);
- :mod:`~worker.alignment.holdout`: held-out evaluation at fixed timesteps and noise;
- :mod:`~worker.alignment.guard`: the loss guards, best-checkpoint selection, early stopping and
  the drift budget;
- :mod:`~worker.alignment.checkpoints`: resumable, atomic checkpoints;
- :mod:`~worker.alignment.encode_cache`: the VAE latents and prompt embeddings, encoded once.

Per pair (docs/dde.md): one timestep k (from :class:`~worker.alignment.credit.TimestepSampler`)
and one noise ε shared by the winner and the loser; the policy runs on the batch [winners;
losers]; the reference runs on the same inputs under ``no_grad`` (LoRA: the same UNet with its
adapters disabled; full fine-tune: a frozen copy); the loss is
:func:`~worker.alignment.losses.preference_loss` on the per-sample MSEs.

Held-out pairs (``heldout=``, evaluated every ``eval_every`` steps and before the first): the
run keeps the weights of its best held-out evaluation within the drift budget, stops early when
the held-out loss stops improving (``early_stopping_patience``) or the drift passes
``drift_budget``, and writes *those* weights as its result (``TrainResult.best_step``).

Frozen encodings (``encode_cache=True``, the default): every training image's VAE latent
distribution and every prompt's embedding are encoded once per run into
``output_dir/encode-cache`` (:mod:`~worker.alignment.encode_cache`), which a resumed run reuses;
a step samples its latents from the cached distributions with the same generators, so the run
is the one it would be without the cache, up to float rounding.

Reproducibility: every random draw of a pair (its timestep, ε, and the VAE's latent sample)
comes from a generator seeded by (seed, the pair's position in the data stream), and the data
order of each epoch from (seed, epoch). So a run is a function of (seed, data, config): two runs
give the same adapter, a run resumed from a checkpoint ends where the unbroken run ends, and
``batch_size=2, grad_accum=1`` equals ``batch_size=1, grad_accum=2`` up to float rounding.

Safety: a non-finite loss or gradient, a sustained loss spike, or a run bad from the start
(:class:`~worker.alignment.guard.LossSpikeGuard`) stops the run with :class:`TrainingDiverged`;
``should_stop()`` stops it with :class:`TrainingCancelled`. Neither writes the final adapter, and
the final adapter of a previous attempt is removed when a run starts, so a file at
``TrainResult.adapter_path`` always comes from a run that finished.

Nothing here imports from the web or database layers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from worker.alignment.adapters import (
    adapters_disabled,
    add_lora,
    file_sha256,
    has_adapter,
    prepare_full_finetune,
    save_adapter,
    save_full_weights,
    unwrap_model,
)
from worker.alignment.backbone import Backbone, Conditioning
from worker.alignment.checkpoints import (
    CHECKPOINT_DIRNAME,
    RunState,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from worker.alignment.config import TrainConfig
from worker.alignment.credit import CreditParams, TimestepSampler
from worker.alignment.data import (
    SEED_TAG_LOADER,
    SEED_TAG_PAIR,
    PairDataset,
    PreferencePair,
    SeededEpochSampler,
    collate,
    data_fingerprint,
    derive_seed,
    image_to_tensor,
)
from worker.alignment.encode_cache import CACHE_DIRNAME as ENCODE_CACHE_DIRNAME
from worker.alignment.encode_cache import EncodingCache, load_or_build
from worker.alignment.fidelity import FidelityProbe, ProbeReading
from worker.alignment.guard import EvalTracker, LossSpikeGuard
from worker.alignment.holdout import HeldOutSet
from worker.alignment.losses import (
    PreferenceLossOutput,
    epsilon_error_scale,
    pair_losses,
    per_sample_mse,
)
from worker.alignment.metrics import EvalMetrics, StepMetrics

__all__ = [
    "ADAPTER_FILENAME",
    "CHECKPOINT_DIRNAME",
    "FULL_WEIGHTS_FILENAME",
    "EvalMetrics",
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


@dataclass
class TrainResult:
    """A finished run.

    Attributes:
        adapter_path: the LoRA adapter (``adapter.safetensors``) or, for ``finetune="full"``,
            the UNet weights (``unet.safetensors``), in ``output_dir``: the weights of the best
            held-out evaluation when there were held-out pairs, else those of the last step.
        adapter_sha256: hex SHA-256 of that file.
        steps: optimizer steps trained in total (including those before a resume).
        history: one :class:`StepMetrics` per step.
        final: the last step's metrics.
        finetune: ``"lora"`` or ``"full"``.
        resumed_from: the checkpoint step this run resumed from, or None.
        pairs_used: number of pairs trained on (ties dropped unless included).
        evals: the held-out evaluations, in step order (the first at step 0); empty without
            held-out pairs.
        best_step: the step whose weights were written (``steps`` without held-out pairs; 0
            means no evaluation beat the reference itself).
        stop_reason: why the run stopped before ``config.steps`` (early stopping, the drift
            budget), or None.
    """

    adapter_path: Path
    adapter_sha256: str
    steps: int
    history: list[StepMetrics]
    final: StepMetrics
    finetune: str
    resumed_from: int | None = None
    pairs_used: int = 0
    evals: list[EvalMetrics] = field(default_factory=list)
    best_step: int = 0
    stop_reason: str | None = None

    @property
    def best_eval(self) -> EvalMetrics | None:
        return next((e for e in self.evals if e.step == self.best_step), None)


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


# ============================================================================ what torch offers
def use_sdpa(model: nn.Module) -> int:
    """Gives every attention layer of a diffusers model that runs the classic processor
    (``AttnProcessor``: explicit ``baddbmm`` + softmax) PyTorch's fused
    ``scaled_dot_product_attention`` (``AttnProcessor2_0``) instead; other processors (custom,
    IP-adapter, already SDPA) are left alone. Returns how many were switched.

    diffusers picks SDPA by default, so for models from ``from_pretrained`` this changes
    nothing; it guards a model built with ``set_default_attn_processor()`` or older code. On
    the tiny SD UNet (CPU, 1 thread) a LoRA step's UNet passes take 1.50 s with the classic
    processor and 1.00 s with SDPA (docs/training-throughput.md).
    """
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    processors = getattr(model, "attn_processors", None)
    if not processors or not hasattr(torch.nn.functional, "scaled_dot_product_attention"):
        return 0
    classic = [name for name, proc in processors.items() if type(proc) is AttnProcessor]
    if classic:
        model.set_attn_processor(  # type: ignore[operator]
            {
                name: AttnProcessor2_0() if type(proc) is AttnProcessor else proc
                for name, proc in processors.items()
            }
        )
    return len(classic)


def adamw_implementation(device: torch.device, params: Sequence[torch.Tensor]) -> dict[str, Any]:
    """``torch.optim.AdamW`` keyword arguments for this device: the fused CUDA kernel
    (``fused=True``, one kernel for all parameters) when every trained parameter is a float on
    CUDA; else torch's default (the ``foreach`` implementation). GPU-only on purpose: a LoRA
    step's optimizer update is a small part of it on a CPU, and the fused kernel's rounding
    differs a little from the default's, so CPU runs stay as they were."""
    if device.type == "cuda" and all(p.is_cuda and p.is_floating_point() for p in params):
        return {"fused": True}
    return {}


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
        heldout: Sequence[PreferencePair] | None = None,
        on_eval: Callable[[EvalMetrics], None] | None = None,
        fidelity_probe: FidelityProbe | None = None,
        encode_cache: bool = True,
    ) -> None:
        self.backbone = backbone
        self.encode_cache = encode_cache
        self.cache: EncodingCache | None = None
        self._cache_stopped = False
        self.fidelity_probe = fidelity_probe
        self.config = config
        self.output_dir = output_dir
        self.progress = progress
        self.should_stop = should_stop
        self.resume = resume
        self.progress_bar = progress_bar
        self.on_eval = on_eval
        self.heldout_pairs = [p for p in (heldout or []) if not p.tie]
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
        use_sdpa(unet)
        if self.reference is not None:
            use_sdpa(self.reference)
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
                **adamw_implementation(acc.device, params),
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

        # with the encode cache, a step reads its latents from the cache: no image to convert
        self.cache_latents = self.encode_cache and bb.vae is not None
        self.sampler = SeededEpochSampler(len(self.pairs), cfg.seed)
        dataloader = DataLoader(
            PairDataset(self.pairs, self.resolution, images=not self.cache_latents),
            batch_size=cfg.batch_size,
            sampler=self.sampler,
            collate_fn=collate,
            drop_last=False,
            num_workers=0,
            # its own generator: creating an iterator then draws no seed from the global torch
            # RNG, whose state (LoRA dropout) checkpoints restore exactly
            generator=torch.Generator().manual_seed(derive_seed(cfg.seed, SEED_TAG_LOADER)),
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
        self.fingerprint = data_fingerprint(self.pairs)
        self.heldout: HeldOutSet | None = None
        if self.heldout_pairs and cfg.eval_every > 0:
            self.heldout = HeldOutSet(
                bb,
                self.heldout_pairs,
                scheme=cfg.scheme,
                k=cfg.eval_timesteps,
                beta=cfg.beta,
                seed=cfg.seed,
                resolution=self.resolution,
                params=CreditParams(tau_center=cfg.tau_center, tau_halfwidth=cfg.tau_halfwidth),
                batch_size=max(1, 64 // cfg.eval_timesteps),
            )
            self.fingerprint += "+" + data_fingerprint(self.heldout_pairs)

    def _teardown(self) -> None:
        from accelerate.state import AcceleratorState, GradientState

        bb = self.backbone
        if self.cache is not None:
            self.cache.close()
            self.cache = None
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

    # ---------------------------------------------------------------- the encode cache
    def _encode_cache(self) -> EncodingCache | None:
        """The round's VAE latent distributions and prompt embeddings (see
        :mod:`~worker.alignment.encode_cache`), from ``output_dir/encode-cache`` or encoded now.

        Every process gets it without a collective: the main process loads or builds and
        writes the file; the others load it if it is there already, else encode in memory (on
        their own devices, at the same time). While building, the main process polls
        ``should_stop``; a stop leaves the cache unbuilt (None) and the loop's first check then
        cancels the run on every process.
        """
        acc = self.accelerator
        poll = self.should_stop if acc.is_main_process else None
        cache = load_or_build(
            self.backbone,
            self.pairs,
            resolution=self.resolution,
            directory=self.output_dir / ENCODE_CACHE_DIRNAME,
            device=acc.device,
            batch_size=2 * self.config.batch_size,
            write=acc.is_main_process,
            should_stop=poll,
        )
        if cache is not None:
            logger.info(
                "encode cache %s: %d prompts%s",
                "reused" if cache.reused else "built",
                len(cache.prompts),
                f", {2 * len(self.pairs)} latent distributions" if cache.has_latents else "",
            )
        elif self.cache_latents:
            # the build was stopped: the data stream carries no images, so no step may run;
            # the loop's first check cancels the run on every process
            self._cache_stopped = True
        return cache

    # ---------------------------------------------------------------- one micro-batch
    def _micro_batch(
        self, batch: dict[str, Any]
    ) -> tuple[torch.Tensor, PreferenceLossOutput, torch.Tensor]:
        cfg = self.config
        bb = self.backbone
        acc = self.accelerator
        device = acc.device
        prompts: list[str] = batch["prompt"]
        cache = self.cache
        gens = [
            torch.Generator().manual_seed(derive_seed(cfg.seed, SEED_TAG_PAIR, int(pos)))
            for pos in batch["position"].tolist()
        ]
        # per pair, in this order: timestep, noise, VAE sample of the winner, of the loser
        draws = [self.timestep_sampler.sample(1, g) for g in gens]
        timesteps = torch.cat([d[0] for d in draws]).to(device)
        weights = torch.cat([d[1] for d in draws]).to(device)
        noise = torch.stack([torch.randn(self.latent_shape, generator=g) for g in gens])

        with torch.no_grad():
            if cache is not None and cache.has_latents:
                # the same draws from the same distributions, without the VAE pass
                latents = cache.sample_latents(
                    batch["index"].tolist(), gens, device=device, dtype=bb.dtype
                )
            else:
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
            cond: Conditioning = (
                cache.conditioning(prompts, device)
                if cache is not None
                else bb.encode_prompts(prompts)
            ).repeat(2)
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
            weights=weights if cfg.timestep_mode != "importance" else None,
            loss_scale=1.0 / weights if cfg.timestep_mode == "importance-corrected" else None,
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

    def _checkpoint_meta(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "data_fingerprint": self.fingerprint,
            "num_processes": self.accelerator.num_processes,
            "finetune": self.config.finetune,
        }

    def _save_checkpoint(self, state: RunState) -> None:
        save_checkpoint(
            self.accelerator,
            self.output_dir,
            state,
            named_parameters=dict(self._unet.named_parameters()),
            trainable_names=self.trainable_names,
            optimizer=self.optimizer,
            lr_scheduler=self.lr_scheduler,
            meta=self._checkpoint_meta(),
            keep=self.config.keep_checkpoints,
            best=self.best_weights,
        )

    def _load_checkpoint(self, path: Path) -> RunState:
        state, best = load_checkpoint(
            self.accelerator,
            path,
            named_parameters=dict(self._unet.named_parameters()),
            trainable_names=self.trainable_names,
            optimizer=self.optimizer,
            lr_scheduler=self.lr_scheduler,
            check=self._resume_compatible,
            mismatch=ResumeMismatchError,
        )
        if state.step > self.config.steps:
            raise ResumeMismatchError(
                f"checkpoint {path} is at step {state.step}, past steps={self.config.steps}"
            )
        self.best_weights = best
        return state

    # ---------------------------------------------------------------- held-out evaluation
    def _trainable_snapshot(self) -> dict[str, torch.Tensor]:
        named = dict(self._unet.named_parameters())
        return {n: named[n].detach().to("cpu", copy=True) for n in self.trainable_names}

    def _evaluate(self, step: int) -> tuple[EvalMetrics, bool, str | None]:
        """Evaluates the held-out set at ``step`` (every process, on the unwrapped UNet, so no
        collective runs and every process takes the same decision)."""
        assert self.heldout is not None
        bb, acc, unet = self.backbone, self.accelerator, self._unet

        def policy(x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
            with acc.autocast():
                return bb.predict_noise(x, t, cond, unet=unet)

        def reference(x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
            with acc.autocast():
                if self.reference is not None:
                    return bb.predict_noise(x, t, cond, unet=self.reference)
                with adapters_disabled(unet) as base:
                    return bb.predict_noise(x, t, cond, unet=base)

        was_training = unet.training
        unet.eval()
        try:
            m = self.heldout.evaluate(policy, reference, step=step, device=acc.device)
            if self.fidelity_probe is not None:
                reading = self._read_probe(self.fidelity_probe)
                m = dataclasses.replace(m, fidelity=reading.delta, fidelity_sem=reading.sem)
        finally:
            unet.train(was_training)
        is_best, stop = self.tracker.observe(m)
        if is_best:
            self.best_weights = self._trainable_snapshot()
        logger.info(
            "held-out @%d: acc %.3f loss %.4f drift %.4g%s%s",
            step,
            m.accuracy,
            m.loss,
            m.drift,
            "" if m.fidelity is None else f" fidelity {m.fidelity:+.4f}±{m.fidelity_sem:.4f}",
            " (best)" if is_best else "",
        )
        if self.on_eval is not None and acc.is_main_process:
            self.on_eval(m)
        return m, is_best, stop

    def _read_probe(self, probe: FidelityProbe) -> ProbeReading:
        """Samples the probe's units from the policy (and, once per run, from the reference:
        the UNet with adapters disabled, or the frozen copy) and reads the paired change.
        Every process samples the same units with the same weights, so every process takes the
        same decision without a collective."""
        from worker.alignment.sampling import sample

        bb, acc, unet = self.backbone, self.accelerator, self._unet

        def sampler_with(model: nn.Module) -> Callable[[list[str], list[int]], np.ndarray]:
            def _sample(prompts: list[str], seeds: list[int]) -> np.ndarray:
                saved = bb.unet
                bb.unet = model
                try:
                    with acc.autocast():
                        out = sample(
                            bb,
                            prompts,
                            seeds,
                            num_inference_steps=probe.num_inference_steps,
                            batch_size=probe.batch_size,
                        )
                finally:
                    bb.unet = saved
                return np.stack([g.image for g in out])

            return _sample

        if probe.reference_scores is None:
            if self.reference is not None:
                probe.set_reference(sampler_with(self.reference))
            else:
                with adapters_disabled(unet) as base:
                    probe.set_reference(sampler_with(base))
        return probe.read(sampler_with(unet))

    def _restore_best(self, state: RunState) -> int:
        """Loads the best held-out weights into the UNet; returns their step."""
        best = self.tracker.best
        if best is None or self.best_weights is None:
            return state.step
        if best.step != state.step:
            named = dict(self._unet.named_parameters())
            with torch.no_grad():
                for name, value in self.best_weights.items():
                    named[name].copy_(value.to(named[name].device, named[name].dtype))
        return best.step

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
        if self.encode_cache:
            self.cache = self._encode_cache()

        state = RunState()
        self.guard = LossSpikeGuard.from_config(cfg)
        self.tracker = EvalTracker.from_config(cfg)
        self.best_weights: dict[str, torch.Tensor] | None = None
        resumed_from: int | None = None
        ckpt = latest_checkpoint(self.output_dir) if self.resume else None
        if ckpt is not None:
            state = self._load_checkpoint(ckpt)
            if state.guard:
                self.guard.load_state_dict(state.guard)
            if state.evals:
                self.tracker.load_state_dict(state.evals)
            resumed_from = state.step
            logger.info("resumed from %s (step %d)", ckpt, state.step)

        stop_reason: str | None = None
        if self.heldout is not None and not self.tracker.evals:
            _, _, stop_reason = self._evaluate(0)  # the reference: acc 0.5, loss ln 2, drift 0
            state.evals = self.tracker.state_dict()

        show_bar = self.progress_bar
        if show_bar is None:
            show_bar = self.progress is None and sys.stdout.isatty()
        bar = None
        if show_bar and acc.is_main_process:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=state.step, desc="train", unit="step")

        stream = self._stream(state.position)
        try:
            while state.step < cfg.steps and stop_reason is None:
                if self.should_stop is not None:
                    stop = acc.is_main_process and (self._cache_stopped or self.should_stop())
                    flag = torch.tensor([1 if stop else 0], device=acc.device)
                    if int(broadcast(flag).item()):
                        raise TrainingCancelled(state.step)
                metrics = self._train_step(state, stream)
                state.history.append(metrics)
                if self.heldout is not None and (
                    state.step % cfg.eval_every == 0 or state.step == cfg.steps
                ):
                    _, _, stop_reason = self._evaluate(state.step)
                    state.evals = self.tracker.state_dict()
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
                    and (
                        state.step % cfg.log_every == 0
                        or state.step == cfg.steps
                        or stop_reason is not None
                    )
                ):
                    self.progress(metrics)
        finally:
            if bar is not None:
                bar.close()
        if stop_reason is not None:
            logger.info("stopped at step %d: %s", state.step, stop_reason)

        for name, p in self._unet.named_parameters():
            if p.requires_grad and not torch.isfinite(p).all():
                raise TrainingDiverged(state.step, f"non-finite weights in {name}")
        best_step = self._restore_best(state) if self.heldout is not None else state.step
        acc.wait_for_everyone()
        sha = ""
        if acc.is_main_process:
            header = {
                "scheme": cfg.scheme,
                "steps": str(state.step),
                "best_step": str(best_step),
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
            if resumed_from is None or stop_reason is None:
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
            evals=list(self.tracker.evals),
            best_step=best_step,
            stop_reason=stop_reason,
        )

    def _train_step(self, state: RunState, stream: Iterator[dict[str, Any]]) -> StepMetrics:
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
    heldout: Sequence[PreferencePair] | None = None,
    on_eval: Callable[[EvalMetrics], None] | None = None,
    fidelity_probe: FidelityProbe | None = None,
    encode_cache: bool = True,
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
        heldout: held-out pairs (never trained on; split them by prompt with
            :func:`worker.alignment.data.split_by_prompt`). With ``config.eval_every > 0`` they
            are evaluated before the first step and every ``eval_every`` steps; the run then
            keeps its best evaluation within ``config.drift_budget``, may stop early, and writes
            the best weights (:class:`TrainResult` ``best_step``, ``evals``, ``stop_reason``).
        on_eval: called on the main process with each held-out :class:`EvalMetrics`.
        fidelity_probe: with held-out evaluation, a :class:`FidelityProbe` read at every
            evaluation (its paired change lands in :attr:`EvalMetrics.fidelity`); an
            evaluation that falls by more than ``config.fidelity_budget`` stops the run.
        encode_cache: encode every training image's VAE latent distribution and every prompt's
            embedding once, into ``output_dir/encode-cache`` (reused by a resumed run), instead
            of at every step (:mod:`worker.alignment.encode_cache`). The result is the same up
            to float rounding (the VAE runs on other batches); False encodes at every step.

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
        heldout,
        on_eval,
        fidelity_probe,
        encode_cache,
    )
    return trainer.run()
