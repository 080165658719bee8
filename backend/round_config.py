"""The configuration of a training round, as the API accepts and stores it.

It shares field names and defaults with the trainer's ``worker.alignment.config.TrainConfig``
(two fields keep their older API names, :data:`RENAMED_FIELDS`; :data:`ROUND_ONLY_FIELDS` are
the round's own), and :func:`train_config_kwargs` is the one mapping onto it. Per-family
defaults come from :mod:`backend.model_family`. ``POST /api/v1/rounds`` takes a partial dict of overrides; they are merged
onto the defaults and validated here, so a bad value is a 422 naming the field, before any
row is written. ``RoundConfig.model_json_schema()`` is served at
``GET /api/v1/rounds/config-schema`` for forms and clients.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from backend.model_family import FAMILIES, family_of

Scheme = Literal["dde", "uniform", "dde-stepwise", "dde-single-shot"]
TimestepMode = Literal["importance", "weighted", "importance-corrected"]

#: RoundConfig fields that only the round (worker.rounds) reads; the trainer has no such field.
ROUND_ONLY_FIELDS: frozenset[str] = frozenset(
    {
        "min_pairs",
        "max_epochs",
        "eval_prompts",
        "holdout_fraction",
        "min_heldout_gain",
        "fidelity_units",
        "fidelity_sampling_steps",
        "label_rule",
        "exclude_flagged",
        "data_source",
    }
)
#: RoundConfig fields stored under another name (and form) in TrainConfig: API name -> trainer's.
RENAMED_FIELDS: Mapping[str, str] = MappingProxyType(
    {"warmup_steps": "lr_warmup_steps", "full_finetune": "finetune"}
)
#: Settings older rows may still carry, with the one value that is dropped silently (it meant
#: "off"); any other value is an error naming the setting.
_REMOVED_FIELDS: Mapping[str, tuple[Any, str]] = MappingProxyType(
    {
        "label_smoothing": (
            0.0,
            "label_smoothing is no longer supported; remove it (conservative DPO was never "
            "implemented)",
        ),
        "label_noise": (
            "none",
            "label_noise is no longer supported; remove it (no label-noise model was ever "
            "implemented; 'none' was the only value)",
        ),
    }
)


class RoundConfig(BaseModel):
    """Knobs of one DDE / Diffusion-DPO round.

    Every field is either a :class:`worker.alignment.config.TrainConfig` field of the same name
    and default, one of :data:`RENAMED_FIELDS`, or one of :data:`ROUND_ONLY_FIELDS`
    (``tests/alignment/test_config_agreement.py`` checks it); :func:`train_config_kwargs` is
    the one mapping onto the trainer's config.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # ---------------------------------------------------------------- the method
    scheme: Scheme = Field(
        "dde",
        description="Credit over the trajectory: dde (middle-of-trajectory credit), uniform "
        "(Diffusion-DPO's uniform timesteps), dde-stepwise, dde-single-shot.",
    )
    timestep_mode: TimestepMode = Field(
        "importance",
        description="How the credit W(k) enters: importance (draw k by credit, one β), "
        "weighted (k uniform, W(k) scales the logit inside the log-sigmoid), "
        "importance-corrected (k by credit, W(k) inside, loss / W(k): weighted's objective).",
    )
    beta: float = Field(
        5000.0,
        gt=0,
        le=1e6,
        description="KL strength of the DPO objective, loss = -logsigmoid(-0.5 beta "
        "(dtheta - dref)); 5000 for SD1.5/SDXL (diffusers' example writes 2500 for the same loss).",
    )
    winner_anchor: float = Field(
        0.0,
        ge=0.0,
        le=1e6,
        description="DPO-Positive's lambda: also penalise the model for denoising the winner "
        "worse than the reference (0 = plain Diffusion-DPO / DDE).",
    )
    include_ties: bool = Field(False, description="Train on ties (label 0.5) instead of dropping.")

    # ---------------------------------------------------------------- optimisation
    learning_rate: float = Field(1e-5, gt=0, le=1.0, description="Peak learning rate.")
    steps: int = Field(200, ge=1, le=1_000_000, description="Optimizer steps.")
    batch_size: int = Field(8, ge=1, le=4096, description="Pairs per micro-batch.")
    grad_accum: int = Field(1, ge=1, le=1024, description="Micro-batches per optimizer step.")
    warmup_steps: int = Field(
        0,
        ge=0,
        le=1_000_000,
        description="Linear learning-rate warmup (the trainer's lr_warmup_steps).",
    )
    max_grad_norm: float = Field(1.0, gt=0, le=1e4, description="Clip the global gradient norm.")

    # ---------------------------------------------------------------- what is trained
    lora_rank: int = Field(8, ge=1, le=1024, description="LoRA rank (ignored with full_finetune).")
    lora_alpha: float | None = Field(None, gt=0, le=4096, description="Defaults to the rank.")
    full_finetune: bool = Field(
        False, description="Train every UNet weight instead of a LoRA (the trainer's finetune)."
    )
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        "no", description="accelerate mixed precision (fp16 / bf16 on a GPU)."
    )
    gradient_checkpointing: bool = Field(False, description="Less memory, about 30% slower.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of everything random.")

    # ---------------------------------------------------------------- the round's data
    min_pairs: int = Field(1, ge=1, le=10_000_000, description="Fail fast below this many pairs.")
    label_rule: Literal["each", "majority", "dawid_skene"] = Field(
        "each",
        description="How a pair's votes become training labels (backend/aggregation.py, "
        "docs/data-quality.md): each (every vote trains), majority (one label per pair, a tie "
        "at the top drops the pair), dawid_skene (one label per pair, votes weighted by each "
        "annotator's estimated accuracy).",
    )
    data_source: Literal["collected", "imported", "both"] = Field(
        "both",
        description="Which votes the round trains on: collected (pairs the pool made), "
        "imported (Pick-a-Pic imports, cross-model pairs included) or both.",
    )
    exclude_flagged: bool = Field(
        False,
        description="Leave out the votes of annotators flagged as unreliable (gold accuracy, "
        "the outlier test, implausibly fast votes; docs/data-quality.md).",
    )
    max_epochs: float | None = Field(
        2.0,
        gt=0,
        le=1e6,
        description="Train at most this many passes over the round's pairs: a round with few "
        "pairs trains fewer than `steps` steps (at least 1). Many passes over few pairs damage "
        "the model (docs/alignment-benchmark.md). null: always train `steps`.",
    )
    holdout_fraction: float = Field(
        0.15,
        ge=0.0,
        le=0.5,
        description="Share of the round's pairs held out from training (split by prompt) to "
        "evaluate on; 0 disables held-out evaluation.",
    )

    # ---------------------------------------------------------------- held-out evaluation
    eval_every: int = Field(
        10,
        ge=0,
        le=1_000_000,
        description="Evaluate the held-out pairs every N optimizer steps (and at the last "
        "step); 0 disables held-out evaluation.",
    )
    eval_timesteps: int = Field(
        4,
        ge=1,
        le=1000,
        description="Fixed timesteps per held-out pair (at quantiles of the scheme's credit "
        "distribution), each with a fixed noise draw.",
    )
    early_stopping_patience: int = Field(
        5,
        ge=0,
        le=1_000_000,
        description="Stop when the held-out loss has not improved by more than "
        "early_stopping_min_delta for this many evaluations; 0 never stops early.",
    )
    early_stopping_min_delta: float = Field(
        1e-4,
        ge=0.0,
        le=1e6,
        description="The least decrease of the held-out loss that counts as an improvement.",
    )
    drift_budget: float | None = Field(
        0.5,
        gt=0.0,
        le=1e6,
        description="Largest allowed drift of the policy from the reference on the held-out "
        "images at the fixed draws, sum |eps_theta - eps_ref|^2 / sum |eps - eps_ref|^2; when an "
        "evaluation exceeds it, training stops and the best checkpoint within budget is kept. "
        "null disables the budget.",
    )
    fidelity_budget: float | None = Field(
        None,
        ge=0.0,
        le=1e6,
        description="Largest allowed fall of the fidelity probe: the model family's automatic "
        "prompt-fidelity metric (the judge on the built-in model, CLIP score when "
        "PREFLOOP_CLIP_MODEL_PATH is set) on fidelity_units fixed units of the held-out "
        "prompts, paired against the parent, read at every held-out evaluation. When an "
        "evaluation falls further, training stops and the best checkpoint within budget is "
        "kept. null disables the probe.",
    )
    fidelity_patience: int = Field(
        1,
        ge=1,
        le=1000,
        description="Held-out evaluations in a row past fidelity_budget that stop the round. "
        "A reading past the budget is never kept either way; 2 lets one noisy reading pass "
        "when the next is back within budget.",
    )
    fidelity_units: int = Field(
        64,
        ge=2,
        le=100_000,
        description="Images (held-out prompt, fixed seed) the fidelity probe samples at each "
        "held-out evaluation.",
    )
    fidelity_sampling_steps: int | None = Field(
        None,
        ge=1,
        le=1000,
        description="Sampling steps of the fidelity probe's images; null: the model's own.",
    )
    min_heldout_gain: float = Field(
        0.02,
        ge=0.0,
        le=0.5,
        description="A round produces a candidate version only if its best held-out "
        "preference accuracy is at least 0.5 + this.",
    )
    eval_prompts: int = Field(32, ge=0, le=100_000, description="Prompts for the judge's eval.")

    # ---------------------------------------------------------------- checkpoints and guards
    checkpoint_every: int = Field(
        100, ge=1, le=1_000_000, description="Write a resumable checkpoint every N steps."
    )
    loss_spike_factor: float = Field(
        4.0,
        gt=1.0,
        le=1e6,
        description="A step whose loss exceeds this times the running median of recent losses "
        "is a spike; sustained spikes stop the round.",
    )
    max_median_loss: float | None = Field(
        1.5,
        gt=0.6931472,
        le=1e6,
        description="Stop the round when the running median loss exceeds this (it starts at "
        "ln 2 = 0.693 and falls while learning); catches a run that is bad from the start. "
        "null disables the check.",
    )
    max_steps_above_chance: int | None = Field(
        100,
        ge=1,
        le=1_000_000,
        description="Stop a round whose running mean training loss stays above ln 2 (chance) "
        "for this many consecutive steps: bad from the start. null disables the check.",
    )

    @model_validator(mode="before")
    @classmethod
    def _drop_removed_settings(cls, data: Any) -> Any:
        """Stored configs of older rounds may carry removed settings: their "off" value is
        dropped, any other value is an error naming the setting."""
        if not isinstance(data, Mapping) or not any(k in data for k in _REMOVED_FIELDS):
            return data
        data = dict(data)
        errors: list[InitErrorDetails] = []
        for name, (off, message) in _REMOVED_FIELDS.items():
            if name not in data:
                continue
            value = data.pop(name)
            if isinstance(value, bool) or value != off:
                errors.append(
                    InitErrorDetails(
                        type=PydanticCustomError("removed_setting", message),
                        loc=(name,),
                        input=value,
                    )
                )
        if errors:
            # a ValidationError keeps each error's loc, so a 422 names the setting
            raise ValidationError.from_exception_data(cls.__name__, errors)
        return data

    @model_validator(mode="after")
    def _check(self) -> RoundConfig:
        if self.warmup_steps > self.steps:
            raise ValueError("warmup_steps must not exceed steps")
        return self


def train_config_kwargs(rc: RoundConfig, *, steps: int | None = None) -> dict[str, Any]:
    """The keyword arguments of ``worker.alignment.config.TrainConfig(**kw)`` for round config
    ``rc``: every field the trainer has under the same name, :data:`RENAMED_FIELDS` translated,
    :data:`ROUND_ONLY_FIELDS` left out, and ``log_every=1`` (a round logs every step).
    ``steps`` replaces ``rc.steps`` (e.g. the round's :func:`epoch_capped_steps`)."""
    kw: dict[str, Any] = {}
    for name in type(rc).model_fields:
        if name in ROUND_ONLY_FIELDS:
            continue
        value = getattr(rc, name)
        if name == "full_finetune":
            kw["finetune"] = "full" if value else "lora"
        elif name in RENAMED_FIELDS:
            kw[RENAMED_FIELDS[name]] = value
        else:
            kw[name] = value
    if steps is not None:
        kw["steps"] = steps
    kw["log_every"] = 1
    return kw


#: Defaults that depend on the family of the round's base model, applied under the admin's
#: overrides (``RoundConfig``'s own field defaults are for whatever no family names); derived
#: from the registry of :mod:`backend.model_family`, kept for compatibility.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    name: dict(family.round_defaults) for name, family in FAMILIES.items()
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
    """The name of ``base_model``'s family (:func:`backend.model_family.family_of`):
    ``"builtin"`` for ``builtin:*`` ids and built-in checkpoint directories, ``"diffusers"`` for
    any other id or path, None for an unknown base model (no version yet)."""
    family = family_of(base_model)
    return family.name if family is not None else None


def _family_defaults(base_model: str | None) -> dict[str, Any]:
    family = family_of(base_model)
    return dict(family.round_defaults) if family is not None else {}


def defaults_for(base_model: str | None) -> dict[str, Any]:
    """The full default config for rounds on ``base_model`` (a JSON-ready dict)."""
    return RoundConfig.model_validate(_family_defaults(base_model)).model_dump(mode="json")


def resolve_config(overrides: dict[str, Any] | None, base_model: str | None = None) -> RoundConfig:
    """The defaults for ``base_model``'s family with ``overrides`` applied on top; raises
    ``pydantic.ValidationError`` when the result is invalid."""
    return RoundConfig.model_validate({**_family_defaults(base_model), **(overrides or {})})
