"""Round-config defaults per base-model family (``backend.round_config``,
``backend.model_family``), the removed settings, and the pure half of the mapping onto the
trainer's config (the half that needs ``TrainConfig``: tests/alignment/test_config_agreement.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from backend import model_family as mf
from backend.round_config import (
    FAMILY_DEFAULTS,
    RENAMED_FIELDS,
    ROUND_ONLY_FIELDS,
    RoundConfig,
    defaults_for,
    epoch_capped_steps,
    model_family,
    resolve_config,
    train_config_kwargs,
)


def _checkpoint_dir(root: Path, name: str, index: object | str | None) -> str:
    """A directory with a ``model_index.json`` holding ``index`` (a str is written raw)."""
    path = root / name
    path.mkdir()
    if index is not None:
        text = index if isinstance(index, str) else json.dumps(index)
        (path / "model_index.json").write_text(text)
    return str(path)


def family_table(tmp_path: Path) -> list[tuple[str | None, str | None]]:
    """Base models and their family: the table both "is it built-in" checks must agree on."""
    return [
        ("builtin:shapes", "builtin"),
        ("builtin:other", "builtin"),
        ("runwayml/stable-diffusion-v1-5", "diffusers"),
        ("/models/my-sdxl", "diffusers"),
        ("builtin", "diffusers"),
        (_checkpoint_dir(tmp_path, "pixel", {"kind": "pixel", "resolution": 32}), "builtin"),
        (_checkpoint_dir(tmp_path, "sd", {"_class_name": "StableDiffusionPipeline"}), "diffusers"),
        (_checkpoint_dir(tmp_path, "broken", "{not json"), "diffusers"),
        (_checkpoint_dir(tmp_path, "list", "[1, 2]"), "diffusers"),
        (_checkpoint_dir(tmp_path, "empty", None), "diffusers"),
        (str(tmp_path / "missing"), "diffusers"),
        (None, None),
        ("", None),
    ]


def test_model_family(tmp_path):
    for base_model, family in family_table(tmp_path):
        assert model_family(base_model) == family, base_model
        found = mf.family_of(base_model)
        assert (found.name if found else None) == family, base_model


def test_a_builtin_checkpoint_given_by_path_gets_the_builtin_defaults(tmp_path):
    path = _checkpoint_dir(tmp_path, "pretrained", {"kind": "pixel"})
    assert defaults_for(path) == defaults_for("builtin:shapes")
    assert defaults_for(path)["learning_rate"] == mf.BUILTIN.round_defaults["learning_rate"]
    assert resolve_config({}, path) == resolve_config({}, "builtin:shapes")


def test_family_defaults_come_from_the_registry():
    assert FAMILY_DEFAULTS == {name: dict(f.round_defaults) for name, f in mf.FAMILIES.items()}
    assert FAMILY_DEFAULTS["builtin"] == {
        "learning_rate": 1e-3,
        "beta": 2000.0,
        "lora_rank": 8,
        "batch_size": 8,
        "max_epochs": 3.0,
        "drift_budget": 0.3,
        "fidelity_budget": 0.01,
        "fidelity_sampling_steps": 10,
    }
    assert FAMILY_DEFAULTS["diffusers"] == {"learning_rate": 1e-5, "beta": 5000.0, "lora_rank": 8}
    assert list(mf.FAMILIES)[-1] == "diffusers"  # the catch-all is tried last
    with pytest.raises(TypeError):
        mf.BUILTIN.round_defaults["beta"] = 1.0  # type: ignore[index]


def test_register_family_goes_before_the_catch_all(monkeypatch):
    monkeypatch.setattr(mf, "FAMILIES", dict(mf.FAMILIES))
    flux = mf.register_family(
        mf.ModelFamily(
            name="flux",
            description="a test family",
            round_defaults={"learning_rate": 2e-5},
            matches=lambda base_model: "flux" in base_model,
        )
    )
    assert list(mf.FAMILIES) == ["builtin", "flux", "diffusers"]
    assert mf.family_of("black-forest-labs/FLUX.1-dev") is mf.DIFFUSERS  # case-sensitive match
    assert mf.family_of("org/flux-small") is flux
    assert resolve_config({}, "org/flux-small").learning_rate == 2e-5
    with pytest.raises(ValueError, match="already registered"):
        mf.register_family(flux)


def test_diffusers_defaults_are_the_diffusion_dpo_lora_example():
    cfg = resolve_config({}, "stabilityai/stable-diffusion-xl-base-1.0")
    # diffusers' example: --learning_rate 1e-5 --rank 8 --beta_dpo 2500 (x2 here: 0.5 convention)
    assert (cfg.learning_rate, cfg.lora_rank, cfg.beta) == (1e-5, 8, 5000.0)


def test_builtin_defaults_differ_from_sd_and_overrides_win():
    builtin = resolve_config({}, "builtin:shapes")
    assert builtin.learning_rate == FAMILY_DEFAULTS["builtin"]["learning_rate"]
    assert builtin.learning_rate >= 50 * resolve_config({}, "some/sd-model").learning_rate
    mine = resolve_config({"learning_rate": 0.02, "steps": 7}, "builtin:shapes")
    assert (mine.learning_rate, mine.steps, mine.lora_rank) == (0.02, 7, builtin.lora_rank)


def test_unknown_base_model_gets_the_plain_defaults():
    assert resolve_config({}, None) == RoundConfig()
    assert defaults_for(None) == RoundConfig().model_dump(mode="json")


def test_family_defaults_are_valid_and_overrides_are_still_validated():
    for family in FAMILY_DEFAULTS:
        RoundConfig.model_validate(FAMILY_DEFAULTS[family])
    with pytest.raises(ValidationError, match="max_median_loss"):
        resolve_config({"max_median_loss": 0.5}, "builtin:shapes")  # below ln 2
    assert resolve_config({"max_median_loss": None}, "builtin:shapes").max_median_loss is None


@pytest.mark.parametrize(
    ("steps", "pairs", "batch", "accum", "max_epochs", "expected"),
    [
        (100, 127, 8, 1, 2.0, 31),  # 2 x 127 / 8 = 31.75 -> 31 (the demo's round)
        (100, 16, 8, 1, 2.0, 4),  # exactly 2 epochs: 32 / 8 = 4, not 3 by float rounding
        (100, 127, 8, 2, 2.0, 15),  # 16 pairs per step: 254 / 16 = 15.9 -> 15
        (100, 10_000, 8, 1, 2.0, 100),  # enough pairs: the requested steps
        (100, 3, 8, 1, 2.0, 1),  # fewer pairs than a batch: still one step
        (100, 0, 8, 1, 2.0, 1),
        (100, 127, 8, 1, None, 100),  # no cap
        (7, 1_000, 4, 1, 0.5, 7),
        (100, 1_000, 4, 1, 0.1, 25),  # 0.1 x 1000 / 4
    ],
)
def test_epoch_capped_steps_hand_computed(steps, pairs, batch, accum, max_epochs, expected):
    assert epoch_capped_steps(steps, pairs, batch, accum, max_epochs) == expected


def test_epoch_cap_is_validated_and_on_by_default():
    assert RoundConfig().max_epochs == 2.0
    assert RoundConfig(max_epochs=None).max_epochs is None
    for bad in (0, -1.0, "many"):
        with pytest.raises(ValidationError, match="max_epochs"):
            RoundConfig(max_epochs=bad)
    with pytest.raises(ValueError, match="max_epochs"):
        epoch_capped_steps(10, 10, 2, 1, 0.0)
    with pytest.raises(ValueError):
        epoch_capped_steps(0, 10, 2, 1, 1.0)


# ---------------------------------------------------------------------------- removed settings
def test_removed_settings_are_dropped_when_off_and_named_otherwise():
    stored = {"label_smoothing": 0.0, "label_noise": "none", "steps": 9}
    assert RoundConfig.model_validate(stored) == RoundConfig(steps=9)
    assert RoundConfig.model_validate({"label_smoothing": 0}) == RoundConfig()
    for config, field, message in [
        ({"label_smoothing": 0.1}, "label_smoothing", "conservative DPO was never implemented"),
        ({"label_noise": "flip"}, "label_noise", "no longer supported"),
    ]:
        with pytest.raises(ValidationError, match=message) as info:
            RoundConfig.model_validate(config)
        assert [e["loc"] for e in info.value.errors()] == [(field,)]
    with pytest.raises(ValidationError) as info:
        RoundConfig.model_validate({"label_smoothing": 0.2, "label_noise": "flip"})
    assert {e["loc"] for e in info.value.errors()} == {("label_smoothing",), ("label_noise",)}
    properties = RoundConfig.model_json_schema()["properties"]
    assert "label_smoothing" not in properties and "label_noise" not in properties


# ---------------------------------------------------------------------------- new settings
@pytest.mark.parametrize(
    ("field", "bad"),
    [
        ("eval_every", -1),
        ("eval_timesteps", 0),
        ("eval_timesteps", 1001),
        ("early_stopping_patience", -1),
        ("early_stopping_min_delta", -1e-3),
        ("drift_budget", 0.0),
        ("max_steps_above_chance", 0),
        ("holdout_fraction", -0.1),
        ("holdout_fraction", 0.6),
        ("min_heldout_gain", -0.01),
        ("min_heldout_gain", 0.51),
    ],
)
def test_new_settings_are_validated(field, bad):
    with pytest.raises(ValidationError) as info:
        RoundConfig(**{field: bad})
    assert [e["loc"] for e in info.value.errors()] == [(field,)]


def test_new_settings_defaults_and_off_values():
    rc = RoundConfig()
    assert (rc.eval_every, rc.eval_timesteps, rc.early_stopping_patience) == (10, 4, 5)
    assert (rc.early_stopping_min_delta, rc.drift_budget, rc.max_steps_above_chance) == (
        1e-4,
        0.5,
        100,
    )
    assert (rc.holdout_fraction, rc.min_heldout_gain) == (0.15, 0.02)
    off = RoundConfig(
        eval_every=0, early_stopping_patience=0, drift_budget=None, max_steps_above_chance=None
    )
    assert off.holdout_fraction == 0.15 and off.drift_budget is None
    for field, info in RoundConfig.model_fields.items():
        assert info.description, f"RoundConfig.{field} has no description"


# ---------------------------------------------------------------------------- the mapping
def test_train_config_kwargs_renames_and_drops_round_only_fields():
    rc = RoundConfig(warmup_steps=3, full_finetune=True, min_pairs=5, eval_prompts=0)
    kw = train_config_kwargs(rc)
    assert kw["lr_warmup_steps"] == 3 and kw["finetune"] == "full" and kw["log_every"] == 1
    assert not (set(kw) & (ROUND_ONLY_FIELDS | set(RENAMED_FIELDS)))
    assert train_config_kwargs(RoundConfig())["finetune"] == "lora"
    assert train_config_kwargs(rc, steps=5)["steps"] == 5
    assert train_config_kwargs(rc)["steps"] == rc.steps
    assert ROUND_ONLY_FIELDS <= set(RoundConfig.model_fields)
    assert set(RENAMED_FIELDS) <= set(RoundConfig.model_fields)
