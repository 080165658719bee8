"""Model families: which kind of model a round's base model is, and the round defaults for it.

The one place that decides "is this the built-in model?": the API (the round defaults of
``GET /api/v1/rounds/config-defaults``, :mod:`backend.round_config`) and the worker
(:func:`worker.model_registry.is_builtin`: which loader, judge and renderer apply) both ask
:func:`family_of`. Standard library only: the backend never imports torch, and recognising a
built-in checkpoint given by path only reads its ``model_index.json``.

Families are tried in registration order; ``diffusers`` matches anything and is always tried
last (:func:`register_family` inserts a new family ahead of it).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

__all__ = [
    "BUILTIN",
    "BUILTIN_PREFIX",
    "BUILTIN_SHAPES",
    "DIFFUSERS",
    "FAMILIES",
    "ModelFamily",
    "family_of",
    "is_pixel_checkpoint",
    "register_family",
]

BUILTIN_SHAPES = "builtin:shapes"
BUILTIN_PREFIX = "builtin:"


@dataclass(frozen=True)
class ModelFamily:
    """A kind of base model.

    ``round_defaults`` are applied under an admin's overrides for rounds on a model of this
    family (``backend.round_config.RoundConfig``'s own field defaults are for an unknown base
    model); ``matches(base_model)`` says whether a base model id or path belongs to it.
    """

    name: str
    description: str
    round_defaults: Mapping[str, Any]
    matches: Callable[[str], bool]

    def __post_init__(self) -> None:
        # a read-only copy: the registry's defaults cannot be changed through a caller's dict
        object.__setattr__(self, "round_defaults", MappingProxyType(dict(self.round_defaults)))


def is_pixel_checkpoint(path: str | Path) -> bool:
    """Whether the directory ``path`` holds a built-in-model checkpoint: its
    ``model_index.json`` has ``"kind": "pixel"`` (written by ``worker.shapes``)."""
    try:
        index = Path(path).expanduser() / "model_index.json"
        if not index.is_file():
            return False
        data = json.loads(index.read_text())
    except (OSError, ValueError, RuntimeError):  # RuntimeError: expanduser without a home
        return False
    return isinstance(data, dict) and data.get("kind") == "pixel"


def _is_builtin(base_model: str) -> bool:
    return (
        base_model == BUILTIN_SHAPES
        or base_model.startswith(BUILTIN_PREFIX)
        or is_pixel_checkpoint(base_model)
    )


BUILTIN = ModelFamily(
    name="builtin",
    description=(
        "The offline built-in model (builtin:shapes, 1.7M parameters, trained from scratch) or "
        "a directory holding one of its checkpoints. Defaults tuned by bench/alignment.py on "
        "its validation split (docs/alignment-benchmark.md); SD-sized learning rates move "
        "nothing on it. The stop rule from bench/taste_rounds.py's validation split "
        "(docs/rounds.md): the judge read on 64 held-out units along training "
        "(fidelity_budget 0.01) decides when a taste round stops, with drift_budget 0.3 "
        "only as the backstop."
    ),
    round_defaults={
        "learning_rate": 1e-3,
        "beta": 2000.0,
        "lora_rank": 8,
        "batch_size": 8,
        "max_epochs": 3.0,
        "drift_budget": 0.3,
        "fidelity_budget": 0.01,
        "fidelity_sampling_steps": 10,
    },
    matches=_is_builtin,
)

DIFFUSERS = ModelFamily(
    name="diffusers",
    description=(
        "Any other hub id or local path: an SD1.5 / SDXL diffusers pipeline. Defaults from "
        "diffusers' Diffusion-DPO LoRA example (--learning_rate 1e-5 --rank 8 --beta_dpo 2500; "
        "β doubled to this project's convention, see worker.alignment.config)."
    ),
    round_defaults={"learning_rate": 1e-5, "beta": 5000.0, "lora_rank": 8},
    matches=lambda base_model: True,
)

#: The registered families by name, in the order :func:`family_of` tries them (the catch-all
#: ``diffusers`` last).
FAMILIES: dict[str, ModelFamily] = {BUILTIN.name: BUILTIN, DIFFUSERS.name: DIFFUSERS}
_FALLBACK = DIFFUSERS.name


def register_family(family: ModelFamily) -> ModelFamily:
    """Adds ``family`` to the registry, tried before the catch-all ``diffusers``; a name that
    is already registered raises ValueError."""
    if family.name in FAMILIES:
        raise ValueError(f"model family {family.name!r} is already registered")
    fallback = FAMILIES.pop(_FALLBACK)
    FAMILIES[family.name] = family
    FAMILIES[_FALLBACK] = fallback
    return family


def family_of(base_model: str | None) -> ModelFamily | None:
    """The family of ``base_model`` (an id such as ``builtin:shapes`` or a hub id, or a local
    path), or None when there is no base model (empty or None)."""
    if not base_model:
        return None
    for family in FAMILIES.values():
        if family.matches(base_model):
            return family
    raise LookupError(f"no model family matches {base_model!r}")  # unreachable: the fallback
