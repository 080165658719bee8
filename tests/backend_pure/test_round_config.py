"""Round-config defaults per base-model family (``backend.round_config``)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from backend.round_config import (
    FAMILY_DEFAULTS,
    RoundConfig,
    defaults_for,
    epoch_capped_steps,
    model_family,
    resolve_config,
)


@pytest.mark.parametrize(
    ("base_model", "family"),
    [
        ("builtin:shapes", "builtin"),
        ("runwayml/stable-diffusion-v1-5", "diffusers"),
        ("/models/my-sdxl", "diffusers"),
        (None, None),
        ("", None),
    ],
)
def test_model_family(base_model, family):
    assert model_family(base_model) == family


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
