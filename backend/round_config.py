"""The configuration of a training round, as the API accepts and stores it.

It mirrors the trainer's knobs (``worker.alignment.config``); the Celery task maps it onto the
trainer's config. ``POST /api/v1/rounds`` takes a partial dict of overrides; they are merged
onto the defaults and validated here, so a bad value is a 422 naming the field, before any
row is written. ``RoundConfig.model_json_schema()`` is served at
``GET /api/v1/rounds/config-schema`` for forms and clients.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Scheme = Literal["dde", "uniform", "dde-stepwise", "dde-single-shot"]
TimestepMode = Literal["importance", "weighted"]


class RoundConfig(BaseModel):
    """Knobs of one DDE / Diffusion-DPO round."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    scheme: Scheme = Field(
        "dde",
        description="Credit over the trajectory: dde (middle-of-trajectory credit), uniform "
        "(Diffusion-DPO's uniform timesteps), dde-stepwise, dde-single-shot.",
    )
    timestep_mode: TimestepMode = Field(
        "importance", description="Sample timesteps by credit (importance) or weight the loss."
    )
    beta: float = Field(2000.0, gt=0, le=1e6, description="KL strength of the DPO objective.")
    learning_rate: float = Field(1e-4, gt=0, le=1.0)
    steps: int = Field(200, ge=1, le=1_000_000, description="Optimizer steps.")
    batch_size: int = Field(8, ge=1, le=4096, description="Pairs per micro-batch.")
    grad_accum: int = Field(1, ge=1, le=1024)
    warmup_steps: int = Field(0, ge=0, le=1_000_000)
    max_grad_norm: float = Field(1.0, gt=0, le=1e4)
    winner_anchor: float = Field(
        0.0,
        ge=0.0,
        le=1e6,
        description="DPO-Positive's lambda: also penalise the model for denoising the winner "
        "worse than the reference (0 = plain Diffusion-DPO / DDE).",
    )
    lora_rank: int = Field(4, ge=1, le=1024, description="LoRA rank (ignored with full_finetune).")
    lora_alpha: float | None = Field(None, gt=0, le=4096, description="Defaults to the rank.")
    full_finetune: bool = False
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    seed: int = Field(0, ge=0, le=2**31 - 1)
    label_noise: Literal["none"] = Field(
        "none", description="Label-noise model of the loss; only 'none' is supported."
    )
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="Conservative DPO.")
    include_ties: bool = Field(False, description="Train on ties (label 0.5) instead of dropping.")
    min_pairs: int = Field(1, ge=1, le=10_000_000, description="Fail fast below this many pairs.")
    max_epochs: float | None = Field(
        2.0,
        gt=0,
        le=1e6,
        description="Train at most this many passes over the round's pairs: a round with few "
        "pairs trains fewer than `steps` steps (at least 1). Many passes over few pairs damage "
        "the model (docs/alignment-benchmark.md). null: always train `steps`.",
    )
    eval_every: int = Field(50, ge=1, le=1_000_000)
    checkpoint_every: int = Field(100, ge=1, le=1_000_000)
    loss_spike_factor: float = Field(
        5.0, gt=1.0, le=1e6, description="Roll back when loss exceeds this times its running mean."
    )
    max_median_loss: float | None = Field(
        1.5,
        gt=0.6931472,
        le=1e6,
        description="Stop the round when the running median loss exceeds this (it starts at "
        "ln 2 = 0.693 and falls while learning); catches a run that is bad from the start. "
        "null disables the check.",
    )
    eval_prompts: int = Field(32, ge=0, le=100_000, description="Prompts for the judge's eval.")

    @model_validator(mode="after")
    def _check(self) -> RoundConfig:
        if self.warmup_steps > self.steps:
            raise ValueError("warmup_steps must not exceed steps")
        return self


#: Defaults that depend on the family of the round's base model, applied under the admin's
#: overrides (``RoundConfig``'s own field defaults are for whatever no family names).
#:
#: - ``builtin``: the offline model ``builtin:shapes`` (1.7M parameters, trained from scratch):
#:   the values tuned by ``bench/alignment.py`` on the validation split
#:   (docs/alignment-benchmark.md). SD-sized learning rates move nothing on it.
#: - ``diffusers``: SD1.5 / SDXL pipelines: diffusers' Diffusion-DPO LoRA example
#:   (``--learning_rate 1e-5 --rank 8 --beta_dpo 2500``; β doubled to this project's convention,
#:   see ``worker.alignment.config``).
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "builtin": {"learning_rate": 1e-3, "beta": 2000.0, "lora_rank": 8, "batch_size": 8},
    "diffusers": {"learning_rate": 1e-5, "beta": 5000.0, "lora_rank": 8},
}


def epoch_capped_steps(
    steps: int, pairs: int, batch_size: int, grad_accum: int, max_epochs: float | None
) -> int:
    """The optimizer steps a round trains: ``steps``, or fewer when that many would pass over
    the ``pairs`` more than ``max_epochs`` times (each step consumes ``batch_size * grad_accum``
    pairs); never fewer than 1. ``max_epochs=None`` disables the cap."""
    if steps < 1 or batch_size < 1 or grad_accum < 1 or pairs < 0:
        raise ValueError("steps, batch_size and grad_accum must be >= 1 and pairs >= 0")
    if max_epochs is None:
        return steps
    if max_epochs <= 0:
        raise ValueError(f"max_epochs must be > 0, got {max_epochs}")
    # a tiny tolerance so that 2.0 epochs of 16 pairs at batch 8 is 4 steps, not 3.9999 -> 3
    affordable = int(max_epochs * pairs / (batch_size * grad_accum) + 1e-9)
    return max(1, min(steps, affordable))


def model_family(base_model: str | None) -> str | None:
    """``"builtin"`` for ``builtin:*`` ids, ``"diffusers"`` for any other id or path, None for
    an unknown base model (no version yet)."""
    if not base_model:
        return None
    return "builtin" if base_model.startswith("builtin:") else "diffusers"


def defaults_for(base_model: str | None) -> dict[str, Any]:
    """The full default config for rounds on ``base_model`` (a JSON-ready dict)."""
    family = model_family(base_model)
    merged = RoundConfig.model_validate(FAMILY_DEFAULTS.get(family or "", {}))
    return merged.model_dump(mode="json")


def resolve_config(overrides: dict[str, Any] | None, base_model: str | None = None) -> RoundConfig:
    """The defaults for ``base_model``'s family with ``overrides`` applied on top; raises
    ``pydantic.ValidationError`` when the result is invalid."""
    family = model_family(base_model)
    merged = {**FAMILY_DEFAULTS.get(family or "", {}), **(overrides or {})}
    return RoundConfig.model_validate(merged)
