"""The API's round config (``backend.round_config.RoundConfig``) and the trainer's
(``worker.alignment.config.TrainConfig``) agree: same names, same defaults, one mapping
(``train_config_kwargs``), the same validation of the new settings; and the worker's "is it
built-in" check is the registry's (``backend.model_family``)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from backend.round_config import (
    RENAMED_FIELDS,
    ROUND_ONLY_FIELDS,
    RoundConfig,
    model_family,
    train_config_kwargs,
)
from worker.alignment.config import ConfigError, TrainConfig
from worker.model_registry import is_builtin

_TRAIN_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_SHARED = [
    name
    for name in RoundConfig.model_fields
    if name not in ROUND_ONLY_FIELDS and name not in RENAMED_FIELDS
]

#: A value other than the default for every RoundConfig field the trainer gets, and what the
#: trainer's field then holds (the renamed fields change form).
_NON_DEFAULT: dict[str, tuple[Any, str, Any]] = {
    "scheme": ("uniform", "scheme", "uniform"),
    "timestep_mode": ("weighted", "timestep_mode", "weighted"),
    "beta": (2500.0, "beta", 2500.0),
    "winner_anchor": (0.5, "winner_anchor", 0.5),
    "include_ties": (True, "include_ties", True),
    "learning_rate": (3e-4, "learning_rate", 3e-4),
    "steps": (77, "steps", 77),
    "batch_size": (3, "batch_size", 3),
    "grad_accum": (2, "grad_accum", 2),
    "warmup_steps": (5, "lr_warmup_steps", 5),
    "max_grad_norm": (2.5, "max_grad_norm", 2.5),
    "lora_rank": (4, "lora_rank", 4),
    "lora_alpha": (16.0, "lora_alpha", 16.0),
    "full_finetune": (True, "finetune", "full"),
    "mixed_precision": ("bf16", "mixed_precision", "bf16"),
    "gradient_checkpointing": (True, "gradient_checkpointing", True),
    "seed": (123, "seed", 123),
    "eval_every": (0, "eval_every", 0),
    "eval_timesteps": (3, "eval_timesteps", 3),
    "early_stopping_patience": (0, "early_stopping_patience", 0),
    "early_stopping_min_delta": (0.01, "early_stopping_min_delta", 0.01),
    "drift_budget": (None, "drift_budget", None),
    "fidelity_budget": (0.005, "fidelity_budget", 0.005),
    "fidelity_patience": (2, "fidelity_patience", 2),
    "checkpoint_every": (7, "checkpoint_every", 7),
    "loss_spike_factor": (6.0, "loss_spike_factor", 6.0),
    "max_median_loss": (None, "max_median_loss", None),
    "max_steps_above_chance": (None, "max_steps_above_chance", None),
}


def _train_default(name: str) -> Any:
    f = _TRAIN_FIELDS[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def test_every_round_field_is_round_only_renamed_or_a_train_field_with_the_same_default():
    for name, info in RoundConfig.model_fields.items():
        if name in ROUND_ONLY_FIELDS:
            assert name not in _TRAIN_FIELDS, f"{name} is round-only but TrainConfig has it"
            continue
        if name in RENAMED_FIELDS:
            assert name not in _TRAIN_FIELDS and RENAMED_FIELDS[name] in _TRAIN_FIELDS
            continue
        assert name in _TRAIN_FIELDS, f"RoundConfig.{name} is not a TrainConfig field"
        assert info.default == _train_default(name), (
            f"{name}: RoundConfig default {info.default!r} != TrainConfig {_train_default(name)!r}"
        )
    # the renamed fields' defaults agree too
    assert RoundConfig().warmup_steps == _train_default("lr_warmup_steps")
    assert ("full" if RoundConfig().full_finetune else "lora") == _train_default("finetune")


def test_the_defaults_map_onto_the_trainers_defaults():
    kw = train_config_kwargs(RoundConfig())
    cfg = TrainConfig(**kw)
    defaults = TrainConfig()
    for name in kw:
        if name == "log_every":
            continue
        assert getattr(cfg, name) == getattr(defaults, name), name
    assert set(kw) == {*_SHARED, *RENAMED_FIELDS.values(), "log_every"}


def test_a_non_default_value_of_every_shared_field_survives_the_mapping():
    assert set(_NON_DEFAULT) == {*_SHARED, *RENAMED_FIELDS}, "add the new field to _NON_DEFAULT"
    rc = RoundConfig(**{name: value for name, (value, _, _) in _NON_DEFAULT.items()})
    cfg = TrainConfig(**train_config_kwargs(rc))
    for name, (value, train_name, expected) in _NON_DEFAULT.items():
        assert getattr(rc, name) == value and value != RoundConfig.model_fields[name].default
        assert getattr(cfg, train_name) == expected, name
    # the optional budgets with a value, not only None
    on = TrainConfig(
        **train_config_kwargs(RoundConfig(drift_budget=0.25, max_steps_above_chance=3))
    )
    assert (on.drift_budget, on.max_steps_above_chance) == (0.25, 3)


@pytest.mark.parametrize(
    ("field", "bad"),
    [
        ("eval_every", -1),
        ("eval_timesteps", 0),
        ("eval_timesteps", 1001),
        ("early_stopping_patience", -1),
        ("early_stopping_min_delta", -1e-3),
        ("drift_budget", 0.0),
        ("fidelity_budget", -0.01),
        ("fidelity_patience", 0),
        ("max_steps_above_chance", 0),
    ],
)
def test_the_new_settings_are_validated_in_both(field, bad):
    with pytest.raises(ValidationError):
        RoundConfig(**{field: bad})
    with pytest.raises(ConfigError) as info:
        TrainConfig(**{field: bad})
    assert info.value.field == field


def test_new_settings_are_documented_and_resumable_where_it_makes_sense():
    new = {
        "eval_every",
        "eval_timesteps",
        "early_stopping_patience",
        "early_stopping_min_delta",
        "drift_budget",
        "fidelity_budget",
        "fidelity_patience",
        "max_steps_above_chance",
    }
    for name in new:
        assert _TRAIN_FIELDS[name].metadata.get("help"), name
        assert RoundConfig.model_fields[name].description, name
    assert new & TrainConfig.RESUMABLE_FIELDS == new - {"eval_every", "eval_timesteps"}


def test_round_config_train_config_uses_the_mapping():
    from worker.round_state import RoundFailed
    from worker.rounds import train_config

    stored = RoundConfig(steps=33, full_finetune=True).model_dump(mode="json")
    assert train_config(stored) == TrainConfig(
        **train_config_kwargs(RoundConfig.model_validate(stored))
    )
    # an older row's removed setting: dropped when off, a failed round naming it otherwise
    assert train_config({**stored, "label_smoothing": 0.0}) == train_config(stored)
    with pytest.raises(RoundFailed, match="label_smoothing is no longer supported"):
        train_config({**stored, "label_smoothing": 0.1})


def test_both_is_it_builtin_checks_agree(tmp_path: Path):
    def checkpoint(name: str, index: str | None) -> str:
        path = tmp_path / name
        path.mkdir()
        if index is not None:
            (path / "model_index.json").write_text(index)
        return str(path)

    table = [
        ("builtin:shapes", True),
        ("builtin:other", True),
        ("runwayml/stable-diffusion-v1-5", False),
        ("/models/my-sdxl", False),
        (checkpoint("pixel", json.dumps({"kind": "pixel"})), True),
        (checkpoint("sd", json.dumps({"_class_name": "StableDiffusionPipeline"})), False),
        (checkpoint("broken", "{not json"), False),
        (checkpoint("empty", None), False),
        (str(tmp_path / "missing"), False),
    ]
    for base_model, builtin in table:
        assert is_builtin(base_model) is builtin, base_model
        assert (model_family(base_model) == "builtin") is builtin, base_model
