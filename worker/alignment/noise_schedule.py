"""The noise schedule's ᾱ from a diffusers scheduler config, with numpy alone.

:func:`alphas_cumprod` gives what ``DDPMScheduler(**config).alphas_cumprod`` gives (diffusers
0.42, ``schedulers/scheduling_ddpm.py``), computed in float64: the ``beta_schedule`` (or the
config's ``trained_betas``), then ``rescale_betas_zero_snr``, then ᾱ_t = Π_{s<=t} (1 - β_s).
diffusers works in float32, so the two agree to about 1e-6 (``tests/alignment/
test_noise_schedule.py`` checks every schedule against diffusers).

It lets a process without torch (the API, for the credit plot of ``GET /api/v1/rounds/credit``)
get the schedule of a model from its ``scheduler/scheduler_config.json``. Only numpy and the
standard library are imported here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["BETA_SCHEDULES", "MAX_TIMESTEPS", "alphas_cumprod", "betas"]

#: The ``beta_schedule`` values understood here (DDPMScheduler's).
BETA_SCHEDULES: tuple[str, ...] = (
    "linear",
    "scaled_linear",
    "squaredcos_cap_v2",
    "sigmoid",
    "laplace",
)
#: The largest ``num_train_timesteps`` accepted (SD uses 1000).
MAX_TIMESTEPS = 100_000

# DDPMScheduler's defaults, for keys a config leaves out.
_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "rescale_betas_zero_snr": False,
}


def _number(config: Mapping[str, Any], key: str) -> float:
    value = config.get(key, _DEFAULTS[key])
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number, got {value!r}")
    return float(value)


def _alpha_bar_betas(num_timesteps: int, kind: str, max_beta: float = 0.999) -> np.ndarray:
    """diffusers' ``betas_for_alpha_bar``: β_i = min(1 - ᾱ(t_{i+1}) / ᾱ(t_i), max_beta)."""
    t = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    if kind == "cosine":
        abar = np.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    else:  # laplace
        centred = 0.5 - t
        lmb = -0.5 * np.copysign(1.0, centred) * np.log(1 - 2 * np.abs(centred) + 1e-6)
        snr = np.exp(lmb)
        abar = np.sqrt(snr / (1 + snr))
    return np.minimum(1 - abar[1:] / abar[:-1], max_beta)


def _rescale_zero_terminal_snr(beta: np.ndarray) -> np.ndarray:
    """diffusers' ``rescale_zero_terminal_snr`` (Lin et al. 2023, Algorithm 1): ᾱ_T becomes 0."""
    sqrt_abar = np.sqrt(np.cumprod(1.0 - beta))
    first, last = sqrt_abar[0], sqrt_abar[-1]
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = sqrt_abar**2
    alpha = np.concatenate((abar[:1], abar[1:] / abar[:-1]))
    return 1.0 - alpha


def betas(config: Mapping[str, Any]) -> np.ndarray:
    """β_t of a diffusers scheduler config, float64, length ``num_train_timesteps``.

    Raises:
        ValueError: a value of the config that is missing its meaning (an unknown
            ``beta_schedule``, a non-numeric ``beta_start``, β outside [0, 1], ...), named.
    """
    if not isinstance(config, Mapping):
        raise ValueError(f"a scheduler config is a JSON object, got {type(config).__name__}")
    trained = config.get("trained_betas")
    if trained is not None:
        try:
            beta = np.asarray(trained, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError("trained_betas must be a list of numbers") from None
        if beta.ndim != 1 or beta.shape[0] < 1:
            raise ValueError("trained_betas must be a non-empty list of numbers")
    else:
        steps = config.get("num_train_timesteps", _DEFAULTS["num_train_timesteps"])
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_TIMESTEPS:
            raise ValueError(
                f"num_train_timesteps must be an integer in [1, {MAX_TIMESTEPS}], got {steps!r}"
            )
        start, end = _number(config, "beta_start"), _number(config, "beta_end")
        schedule = config.get("beta_schedule", _DEFAULTS["beta_schedule"])
        if schedule == "linear":
            beta = np.linspace(start, end, steps, dtype=np.float64)
        elif schedule == "scaled_linear":
            if start < 0 or end < 0:
                raise ValueError("scaled_linear needs beta_start and beta_end >= 0")
            beta = np.linspace(math.sqrt(start), math.sqrt(end), steps, dtype=np.float64) ** 2
        elif schedule == "squaredcos_cap_v2":
            beta = _alpha_bar_betas(steps, "cosine")
        elif schedule == "laplace":
            beta = _alpha_bar_betas(steps, "laplace")
        elif schedule == "sigmoid":
            x = np.linspace(-6.0, 6.0, steps, dtype=np.float64)
            beta = (end - start) / (1.0 + np.exp(-x)) + start
        else:
            raise ValueError(
                f"unknown beta_schedule {schedule!r}; known: {', '.join(BETA_SCHEDULES)}"
            )
    if not np.all(np.isfinite(beta)) or np.any(beta < 0) or np.any(beta > 1):
        raise ValueError("the schedule's betas must lie in [0, 1]")
    if config.get("rescale_betas_zero_snr", False):
        if beta.shape[0] < 2 or np.all(beta == 0):
            raise ValueError("rescale_betas_zero_snr needs a schedule that adds noise")
        beta = _rescale_zero_terminal_snr(beta)
    return beta


def alphas_cumprod(config: Mapping[str, Any]) -> np.ndarray:
    """ᾱ_t = Π_{s<=t} (1 - β_s) of a diffusers scheduler config (the parsed
    ``scheduler_config.json``), float64, length ``num_train_timesteps``; entry i is diffusers
    timestep i, as ``DDPMScheduler(**config).alphas_cumprod``.

    Raises:
        ValueError: as :func:`betas`.
    """
    return np.cumprod(1.0 - betas(config))
