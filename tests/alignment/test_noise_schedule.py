"""ᾱ from a scheduler config with numpy (worker/alignment/noise_schedule.py) is diffusers' ᾱ."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from diffusers import DDPMScheduler

from worker.alignment.noise_schedule import BETA_SCHEDULES, alphas_cumprod, betas

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILTIN_SCHEDULER = REPO_ROOT / "worker" / "shapes" / "checkpoint" / "scheduler"

CONFIGS = [
    {"beta_schedule": "linear"},
    {"beta_schedule": "linear", "beta_start": 0.001, "beta_end": 0.05, "num_train_timesteps": 37},
    # Stable Diffusion 1.5 / SDXL
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    {"beta_schedule": "squaredcos_cap_v2"},
    {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 10},
    {"beta_schedule": "sigmoid", "beta_start": 0.0001, "beta_end": 0.02},
    {"beta_schedule": "laplace"},
    {"beta_schedule": "laplace", "num_train_timesteps": 7},
    {"trained_betas": [0.1, 0.2, 0.3, 0.5]},
    {
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "rescale_betas_zero_snr": True,
    },
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: json.dumps(c, sort_keys=True))
def test_alphas_cumprod_equals_diffusers(config):
    expected = DDPMScheduler(**config).alphas_cumprod.double().numpy()
    got = alphas_cumprod(config)
    assert got.dtype == np.float64 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_every_beta_schedule_is_covered():
    assert {c["beta_schedule"] for c in CONFIGS if "beta_schedule" in c} == set(BETA_SCHEDULES)


def test_the_builtin_checkpoints_scheduler_config():
    config = json.loads((BUILTIN_SCHEDULER / "scheduler_config.json").read_text())
    expected = DDPMScheduler.from_pretrained(BUILTIN_SCHEDULER).alphas_cumprod.double().numpy()
    np.testing.assert_allclose(alphas_cumprod(config), expected, rtol=0, atol=1e-6)


def test_a_tiny_linear_schedule_by_hand():
    # β = 0.1, 0.2, 0.3: ᾱ = 0.9, 0.9 * 0.8, 0.9 * 0.8 * 0.7
    got = alphas_cumprod({"beta_start": 0.1, "beta_end": 0.3, "num_train_timesteps": 3})
    np.testing.assert_allclose(got, [0.9, 0.72, 0.504], rtol=1e-12)


def test_missing_keys_take_ddpms_defaults():
    np.testing.assert_array_equal(alphas_cumprod({}), alphas_cumprod({"beta_schedule": "linear"}))
    assert alphas_cumprod({}).shape == (1000,)


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ({"beta_schedule": "cubic"}, "beta_schedule"),
        ({"num_train_timesteps": 0}, "num_train_timesteps"),
        ({"num_train_timesteps": 1.5}, "num_train_timesteps"),
        ({"num_train_timesteps": True}, "num_train_timesteps"),
        ({"beta_start": "small"}, "beta_start"),
        ({"beta_end": float("nan")}, "beta_end"),
        ({"beta_start": 0.5, "beta_end": 2.0}, "betas"),
        ({"trained_betas": "abc"}, "trained_betas"),
        ({"trained_betas": []}, "trained_betas"),
        ([1, 2], "JSON object"),
    ],
)
def test_bad_configs_are_value_errors_naming_the_key(config, named):
    with pytest.raises(ValueError, match=named):
        betas(config)
