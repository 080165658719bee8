"""The settings of one alignment training run (:func:`worker.alignment.trainer.train`).

:class:`TrainConfig` is a plain dataclass in the style of trl's ``DPOConfig``: every field has a
``help`` entry in its metadata, and ``__post_init__`` validates every value, raising
:class:`ConfigError` whose message (and ``.field``) names the offending field. Round configs come
from the database / API as JSON: :meth:`TrainConfig.from_dict` rejects unknown keys and
:meth:`TrainConfig.to_dict` gives a JSON-ready dict back.

The API's round config (``backend.round_config.RoundConfig``) uses these field names and
defaults for every setting it shares (except ``warmup_steps`` -> ``lr_warmup_steps`` and
``full_finetune`` -> ``finetune``); ``backend.round_config.train_config_kwargs`` is the one
mapping, and ``tests/alignment/test_config_agreement.py`` checks that the two agree. Change a
shared default in both places.

β convention: this project follows Diffusion-DPO's reference code,
``loss = -logsigmoid(-0.5 * beta * (Δθ - Δref))`` with ``beta = 5000`` for SD1.5 and SDXL.
diffusers' example script (``examples/research_projects/diffusion_dpo``) folds the 0.5 into β and
uses 2500: the same loss. Multiply a diffusers-example β by 2 to use it here
(:func:`worker.alignment.losses.beta_from_diffusers_example`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

__all__ = ["ConfigError", "TrainConfig"]


class ConfigError(ValueError):
    """A bad :class:`TrainConfig` value; ``field`` names the setting."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"TrainConfig.{field_name}: {message}")
        self.field = field_name


def _doc(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class TrainConfig:
    """Settings of one DDE / Diffusion-DPO training run. See each field's ``help`` metadata."""

    # ---------------------------------------------------------------- the method
    scheme: str = field(
        default="dde",
        metadata=_doc(
            "Credit scheme over timesteps (worker.alignment.credit.available_schemes()): 'dde' "
            "(default, middle-of-trajectory credit), 'uniform' (Diffusion-DPO), or the ablations "
            "'dde-stepwise' / 'dde-single-shot'."
        ),
    )
    timestep_mode: str = field(
        default="importance",
        metadata=_doc(
            "'importance': draw timestep k with probability W(k)/T and weight 1 (Diffusion-DPO's "
            "cost); 'weighted': draw k uniformly and weight the pair's logit by W(k) (inside the "
            "log-sigmoid); 'importance-corrected': draw k by credit, W(k) inside the "
            "log-sigmoid and the loss divided by W(k): weighted's objective with importance's "
            "draws (worker.alignment.credit.TimestepSampler)."
        ),
    )
    tau_center: float | None = field(
        default=None,
        metadata=_doc("Centre of DDE's switch band (1-based step); None = T/2."),
    )
    tau_halfwidth: float | None = field(
        default=None,
        metadata=_doc(
            "Half-width of DDE's switch band in steps; None = T/10; 0 = one switch step."
        ),
    )
    beta: float = field(
        default=5000.0,
        metadata=_doc(
            "KL strength β in Diffusion-DPO's reference convention, loss = -logsigmoid(-0.5 β "
            "(Δθ - Δref)); 5000 for SD1.5/SDXL. diffusers' example script drops the 0.5 and "
            "writes 2500 for the same loss."
        ),
    )
    winner_anchor: float = field(
        default=0.0,
        metadata=_doc(
            "DPO-Positive's λ (arXiv:2402.13228): adds λ·max(0, D^w) to the winner's side of the "
            "logit, so that the loss also rises when the model denoises the winner worse than "
            "the reference. 0 is plain Diffusion-DPO / DDE, which can lower D^w - D^l by making "
            "both images worse."
        ),
    )
    include_ties: bool = field(
        default=False,
        metadata=_doc(
            "Train on tied pairs (label 0.5) with the symmetric loss "
            "0.5·(-log σ(z) - log σ(-z)), which pulls the two implicit rewards together. "
            "False (the default, as in Diffusion-DPO) drops them."
        ),
    )

    # ---------------------------------------------------------------- optimisation
    steps: int = field(default=200, metadata=_doc("Optimizer steps to train for."))
    batch_size: int = field(
        default=8, metadata=_doc("Preference pairs per micro-batch, per process (2x images).")
    )
    grad_accum: int = field(
        default=1,
        metadata=_doc(
            "Micro-batches accumulated per optimizer step. Effective batch = batch_size x "
            "grad_accum x number of processes."
        ),
    )
    learning_rate: float = field(
        default=1e-5,
        metadata=_doc(
            "Peak learning rate (1e-5 for LoRA as in diffusers' example; Diffusion-DPO's full "
            "fine-tune used 1e-8 x effective batch)."
        ),
    )
    lr_warmup_steps: int = field(
        default=0,
        metadata=_doc("Linear warmup from 0 over this many optimizer steps, then constant."),
    )
    optimizer: str = field(
        default="adamw",
        metadata=_doc(
            "'adamw' (torch.optim.AdamW) or 'adafactor' (the SDXL recipe's, from transformers)."
        ),
    )
    adam_beta1: float = field(default=0.9, metadata=_doc("AdamW β1."))
    adam_beta2: float = field(default=0.999, metadata=_doc("AdamW β2."))
    adam_weight_decay: float = field(
        default=1e-2, metadata=_doc("Decoupled weight decay (AdamW and Adafactor).")
    )
    adam_epsilon: float = field(default=1e-8, metadata=_doc("AdamW ε."))
    max_grad_norm: float | None = field(
        default=1.0, metadata=_doc("Clip the global gradient norm to this; None = no clipping.")
    )

    # ---------------------------------------------------------------- what is trained
    finetune: str = field(
        default="lora",
        metadata=_doc(
            "'lora': train a LoRA adapter, reference = the UNet with adapters disabled; 'full': "
            "train every UNet weight, reference = a frozen copy of the initial UNet."
        ),
    )
    lora_rank: int = field(default=8, metadata=_doc("LoRA rank r."))
    lora_alpha: float | None = field(
        default=None, metadata=_doc("LoRA alpha (update scaled by alpha/r); None = lora_rank.")
    )
    lora_dropout: float = field(default=0.0, metadata=_doc("LoRA dropout probability."))
    lora_target_modules: tuple[str, ...] = field(
        default=("to_q", "to_k", "to_v", "to_out.0"),
        metadata=_doc("UNet module-name suffixes that get LoRA (the attention projections)."),
    )

    # ---------------------------------------------------------------- hardware
    mixed_precision: str = field(
        default="no",
        metadata=_doc(
            "accelerate mixed precision: 'no', 'fp16' or 'bf16' (GPU). Frozen weights are cast "
            "to that dtype; trained weights stay float32."
        ),
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata=_doc("unet.enable_gradient_checkpointing(): less memory, about 30% slower."),
    )
    resolution: int | None = field(
        default=None,
        metadata=_doc(
            "Image side to train at (images are centre-cropped and resized); None = the model's."
        ),
    )
    seed: int = field(
        default=0,
        metadata=_doc(
            "Seed of everything random: data order, timesteps, noise, VAE sampling, LoRA init. "
            "Same seed, data and config -> the same adapter (bit-identical on CPU)."
        ),
    )

    # ---------------------------------------------------------------- checkpoints and logging
    checkpoint_every: int = field(
        default=100,
        metadata=_doc(
            "Write a resumable checkpoint every N optimizer steps (and at the end); 0 = never."
        ),
    )
    keep_checkpoints: int = field(default=2, metadata=_doc("How many recent checkpoints to keep."))
    log_every: int = field(
        default=1, metadata=_doc("Call the progress callback every N steps (and at the last).")
    )
    histogram_bins: int = field(
        default=10, metadata=_doc("Bins of the per-step histogram of sampled timesteps.")
    )

    # ---------------------------------------------------------------- held-out evaluation
    eval_every: int = field(
        default=10,
        metadata=_doc(
            "Evaluate the held-out pairs every N optimizer steps (and at the last step); 0 "
            "disables held-out evaluation."
        ),
    )
    eval_timesteps: int = field(
        default=4,
        metadata=_doc(
            "Fixed timesteps per held-out pair (at quantiles of the scheme's credit "
            "distribution), each with a fixed noise draw; 1..1000."
        ),
    )
    early_stopping_patience: int = field(
        default=5,
        metadata=_doc(
            "Stop when the held-out loss has not improved by more than early_stopping_min_delta "
            "for this many evaluations; 0 never stops early."
        ),
    )
    early_stopping_min_delta: float = field(
        default=1e-4,
        metadata=_doc("The least decrease of the held-out loss that counts as an improvement."),
    )
    drift_budget: float | None = field(
        default=0.5,
        metadata=_doc(
            "The largest allowed drift: the relative change of the policy's noise prediction "
            "against the reference's on the held-out images at the fixed draws, "
            "Σ‖ε_θ−ε_ref‖² / Σ‖ε−ε_ref‖². When an evaluation exceeds it, training stops and the "
            "best checkpoint within budget is kept. None disables the budget."
        ),
    )

    fidelity_budget: float | None = field(
        default=None,
        metadata=_doc(
            "The largest allowed fall of the fidelity probe (the model family's automatic "
            "fidelity metric on fixed held-out units, paired against the reference; "
            "worker.alignment.fidelity). When an evaluation falls further, training stops and "
            "the best checkpoint within budget is kept. None (or a run without a probe) "
            "disables it."
        ),
    )
    fidelity_patience: int = field(
        default=1,
        metadata=_doc(
            "Held-out evaluations in a row past fidelity_budget that stop the run. A reading "
            "past the budget is never kept either way; 1 stops at the first, 2 lets one noisy "
            "reading pass when the next is back within budget."
        ),
    )

    # ---------------------------------------------------------------- divergence guard
    loss_spike_factor: float | None = field(
        default=4.0,
        metadata=_doc(
            "A step whose loss exceeds this factor x the running median of recent losses is a "
            "spike; None disables the spike check (non-finite losses always stop the run)."
        ),
    )
    spike_window: int = field(
        default=50, metadata=_doc("How many recent non-spike step losses the running median uses.")
    )
    spike_min_history: int = field(
        default=10, metadata=_doc("Steps of history needed before spikes are checked.")
    )
    max_consecutive_spikes: int = field(
        default=5,
        metadata=_doc(
            "Stop the run as diverged after this many consecutive spikes (or, under fp16, this "
            "many consecutive optimizer steps skipped for overflowing gradients)."
        ),
    )

    max_median_loss: float | None = field(
        default=1.5,
        metadata=_doc(
            "Stop the run as diverged when the running median of the step losses (over "
            "spike_window steps, once spike_min_history are known) exceeds this. The loss "
            "starts at ln 2 = 0.693 and falls while the model learns the preferences; a median "
            "above 1.5 means the typical pair is preferred the wrong way round with odds of "
            "about 3:1, i.e. a run bad from the start. None disables the check."
        ),
    )
    max_steps_above_chance: int | None = field(
        default=100,
        metadata=_doc(
            "Stop the run when its running mean training loss (over spike_window steps) stays "
            "above ln 2 (chance) for this many consecutive steps: a run bad from the start. "
            "None disables the check."
        ),
    )

    RESUMABLE_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {
            "steps",
            "checkpoint_every",
            "keep_checkpoints",
            "log_every",
            "max_median_loss",
            "loss_spike_factor",
            "spike_window",
            "spike_min_history",
            "max_consecutive_spikes",
            "early_stopping_patience",
            "early_stopping_min_delta",
            "drift_budget",
            "fidelity_budget",
            "fidelity_patience",
            "max_steps_above_chance",
        }
    )
    """Fields that may change between a checkpoint and its resumption."""

    # ------------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        from worker.alignment.credit import available_schemes

        if isinstance(self.lora_target_modules, list):
            self.lora_target_modules = tuple(self.lora_target_modules)

        schemes = available_schemes()
        self._str("scheme", schemes)
        self._str("timestep_mode", ("importance", "weighted", "importance-corrected"))
        self._float("tau_center", minimum=0.0, optional=True)
        self._float("tau_halfwidth", minimum=0.0, optional=True)
        self._float("beta", minimum=0.0, strict=True)
        self._bool("include_ties")

        self._int("steps", minimum=1)
        self._int("batch_size", minimum=1)
        self._int("grad_accum", minimum=1)
        self._float("learning_rate", minimum=0.0, strict=True)
        self._int("lr_warmup_steps", minimum=0)
        self._str("optimizer", ("adamw", "adafactor"))
        self._float("adam_beta1", minimum=0.0, maximum=1.0)
        self._float("adam_beta2", minimum=0.0, maximum=1.0)
        self._float("adam_weight_decay", minimum=0.0)
        self._float("adam_epsilon", minimum=0.0, strict=True)
        self._float("max_grad_norm", minimum=0.0, strict=True, optional=True)

        self._str("finetune", ("lora", "full"))
        self._int("lora_rank", minimum=1)
        self._float("lora_alpha", minimum=0.0, strict=True, optional=True)
        self._float("lora_dropout", minimum=0.0, maximum=1.0)
        if not (
            isinstance(self.lora_target_modules, tuple)
            and self.lora_target_modules
            and all(isinstance(m, str) and m for m in self.lora_target_modules)
        ):
            raise ConfigError(
                "lora_target_modules",
                f"must be a non-empty list of module names, got {self.lora_target_modules!r}",
            )

        self._str("mixed_precision", ("no", "fp16", "bf16"))
        self._bool("gradient_checkpointing")
        self._int("resolution", minimum=8, optional=True)
        self._int("seed", minimum=0)

        self._int("checkpoint_every", minimum=0)
        self._int("keep_checkpoints", minimum=1)
        self._int("log_every", minimum=1)
        self._int("histogram_bins", minimum=1)

        self._int("eval_every", minimum=0)
        self._int("eval_timesteps", minimum=1, maximum=1000)
        self._int("early_stopping_patience", minimum=0)
        self._float("early_stopping_min_delta", minimum=0.0)
        self._float("drift_budget", minimum=0.0, strict=True, optional=True)
        self._float("fidelity_budget", minimum=0.0, optional=True)
        self._int("fidelity_patience", minimum=1)

        self._float("loss_spike_factor", minimum=1.0, strict=True, optional=True)
        self._float("winner_anchor", minimum=0.0)
        self._float("max_median_loss", minimum=math.log(2), strict=True, optional=True)
        self._int("spike_window", minimum=1)
        self._int("spike_min_history", minimum=1)
        self._int("max_consecutive_spikes", minimum=1)
        self._int("max_steps_above_chance", minimum=1, optional=True)
        if self.spike_min_history > self.spike_window:
            raise ConfigError(
                "spike_min_history",
                f"must be <= spike_window ({self.spike_window}), got {self.spike_min_history}",
            )

    def _value(self, name: str) -> Any:
        return getattr(self, name)

    def _str(self, name: str, allowed: Any) -> None:
        value = self._value(name)
        if not isinstance(value, str) or value not in allowed:
            raise ConfigError(name, f"must be one of {list(allowed)}, got {value!r}")

    def _bool(self, name: str) -> None:
        value = self._value(name)
        if not isinstance(value, bool):
            raise ConfigError(name, f"must be true or false, got {value!r}")

    def _int(
        self, name: str, minimum: int, maximum: int | None = None, optional: bool = False
    ) -> None:
        value = self._value(name)
        if value is None and optional:
            return
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(name, f"must be an integer, got {value!r}")
        if value < minimum:
            raise ConfigError(name, f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise ConfigError(name, f"must be <= {maximum}, got {value}")

    def _float(
        self,
        name: str,
        minimum: float,
        maximum: float | None = None,
        strict: bool = False,
        optional: bool = False,
    ) -> None:
        value = self._value(name)
        if value is None and optional:
            return
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(name, f"must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(name, f"must be finite, got {value!r}")
        if strict and value <= minimum:
            raise ConfigError(name, f"must be > {minimum:g}, got {value!r}")
        if not strict and value < minimum:
            raise ConfigError(name, f"must be >= {minimum:g}, got {value!r}")
        if maximum is not None and value >= maximum:
            raise ConfigError(name, f"must be < {maximum:g}, got {value!r}")
        setattr(self, name, value)

    # ------------------------------------------------------------------ (de)serialisation
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Builds a config from a dict (e.g. JSON overrides); unknown keys raise ConfigError."""
        if not isinstance(data, dict):
            raise ConfigError(
                "<root>", f"expected a mapping of settings, got {type(data).__name__}"
            )
        known = set(cls.field_names())
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise ConfigError(
                unknown[0],
                f"unknown setting(s) {unknown}; known settings: {sorted(known)}",
            )
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-ready dict (tuples become lists); ``from_dict`` inverts it."""
        out = dataclasses.asdict(self)
        out["lora_target_modules"] = list(self.lora_target_modules)
        return out

    def replace(self, **changes: Any) -> TrainConfig:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)
