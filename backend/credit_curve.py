"""The credit curve of a scheme over a base model's timesteps: ``GET /api/v1/rounds/credit``.

The admin dashboard plots it beside the start-round form, so that an admin sees where on the
trajectory the chosen scheme puts the preference loss before starting a round.

Where the numbers come from:

- the base model's noise schedule: its ``scheduler/scheduler_config.json`` (for
  ``builtin:shapes``, the shipped checkpoint's under ``worker/shapes/checkpoint``; for a hub id,
  the snapshot in the local Hugging Face cache, as the offline worker finds it), turned into ᾱ by
  :func:`worker.alignment.noise_schedule.alphas_cumprod`, numpy only;
- the credit: :func:`worker.alignment.credit.credit_weights_array` and
  :func:`~worker.alignment.credit.credit_distribution_array` with the schemes' default settings,
  the very functions the trainer's timestep sampler uses (they import no torch, so the API
  needs none: ``tests/deploy/test_packaging.py``).

Both worker modules are pure maths (numpy and the standard library); nothing else of
``worker/`` is imported by the API.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from backend.model_family import BUILTIN_SHAPES
from worker.alignment.credit import (
    UnknownCreditSchemeError,
    credit_distribution_array,
    credit_weights_array,
    get_scheme,
)
from worker.alignment.noise_schedule import alphas_cumprod

__all__ = [
    "DEFAULT_POINTS",
    "BadSchedule",
    "CreditCurve",
    "ScheduleNotFound",
    "credit_curve",
    "downsample",
    "scheduler_config_path",
]

#: Points of a curve when the caller does not ask (enough for a plot a few hundred px wide).
DEFAULT_POINTS = 100
_SCHEDULER_CONFIG = Path("scheduler") / "scheduler_config.json"
_MAX_CONFIG_BYTES = 1_000_000


class ScheduleNotFound(LookupError):
    """No scheduler config for the base model (not a local diffusers directory, not in the
    offline hub cache)."""


class BadSchedule(ValueError):
    """The base model's scheduler config cannot be read, or its schedule has no finite credit."""


@dataclass(frozen=True)
class CreditCurve:
    """A scheme's credit over a schedule, possibly averaged over runs of timesteps.

    Attributes:
        scheme: the scheme's name.
        base_model: the base model whose schedule was used.
        num_train_timesteps: T.
        timesteps: the middle diffusers timestep (0..T-1) of each point's run of timesteps.
        weight: the mean-1 credit W averaged over the run.
        density: the sampling probability per timestep, p = W / Σ W, averaged over the run.
    """

    scheme: str
    base_model: str
    num_train_timesteps: int
    timesteps: list[float]
    weight: list[float]
    density: list[float]


def _hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or str(Path("~/.cache/huggingface").expanduser())
    return Path(home) / "hub"


def _hub_snapshot_config(repo_id: str) -> Path | None:
    """The scheduler config of a hub id's snapshot in the local cache (``refs/main`` first)."""
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts) or any(p in (".", "..") for p in parts):
        return None
    repo = _hub_cache() / f"models--{parts[0]}--{parts[1]}"
    snapshots = repo / "snapshots"
    ref = repo / "refs" / "main"
    candidates: list[Path] = []
    if ref.is_file():
        candidates.append(snapshots / ref.read_text().strip() / _SCHEDULER_CONFIG)
    if snapshots.is_dir():
        candidates += sorted(
            (p / _SCHEDULER_CONFIG for p in snapshots.iterdir()),
            key=lambda p: p.stat().st_mtime if p.is_file() else 0.0,
            reverse=True,
        )
    return next((p for p in candidates if p.is_file()), None)


def _builtin_checkpoint() -> Path:
    spec = importlib.util.find_spec("worker.shapes")  # finds the package without running it
    if spec is None or not spec.submodule_search_locations:
        raise ScheduleNotFound("the built-in model's checkpoint is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "checkpoint"


def scheduler_config_path(base_model: str) -> Path:
    """The ``scheduler_config.json`` of ``base_model``: ``builtin:shapes``, a local diffusers
    (or built-in) checkpoint directory, or a hub id in the local Hugging Face cache.

    Raises:
        ScheduleNotFound: nothing of the kind is on this machine.
    """
    try:
        if base_model == BUILTIN_SHAPES:
            path = _builtin_checkpoint() / _SCHEDULER_CONFIG
        else:
            path = Path(base_model).expanduser() / _SCHEDULER_CONFIG
            if not path.is_file():
                path = _hub_snapshot_config(base_model) or path
        if path.is_file():
            return path
    except (OSError, ValueError, RuntimeError):  # a name no file system takes; no home dir
        pass
    raise ScheduleNotFound(
        f"no scheduler config for base model {base_model!r}: neither a local diffusers "
        f"checkpoint directory with {_SCHEDULER_CONFIG.as_posix()} nor a model in the local "
        "Hugging Face cache"
    )


def _load_schedule(base_model: str) -> np.ndarray:
    path = scheduler_config_path(base_model)
    try:
        with path.open("rb") as f:
            raw = f.read(_MAX_CONFIG_BYTES + 1)
        if len(raw) > _MAX_CONFIG_BYTES:
            raise BadSchedule(f"{path} is larger than {_MAX_CONFIG_BYTES} bytes")
        config = json.loads(raw)
    except (OSError, ValueError) as exc:
        if isinstance(exc, BadSchedule):
            raise
        raise BadSchedule(f"cannot read the scheduler config of {base_model!r}: {exc}") from None
    try:
        return alphas_cumprod(config)
    except ValueError as exc:
        raise BadSchedule(f"the scheduler config of {base_model!r}: {exc}") from None


def downsample(values: np.ndarray, points: int) -> tuple[np.ndarray, np.ndarray]:
    """``values`` (entry i = timestep i) as at most ``points`` means over runs of consecutive
    timesteps of near-equal length; returns ``(middle timestep of each run, mean)``. With
    ``points >= len(values)`` every timestep is its own run (the values unchanged)."""
    if points < 1:
        raise ValueError(f"points must be >= 1, got {points}")
    n = values.shape[0]
    edges = np.linspace(0, n, min(points, n) + 1).round().astype(np.int64)
    starts, ends = edges[:-1], edges[1:]
    sums = np.add.reduceat(values, starts)
    return (starts + ends - 1) / 2.0, sums / (ends - starts)


def credit_curve(scheme: str, base_model: str, points: int = DEFAULT_POINTS) -> CreditCurve:
    """The credit of ``scheme`` over ``base_model``'s schedule, in at most ``points`` points.

    Raises:
        UnknownCreditSchemeError: ``scheme`` is not registered (its message lists the known).
        ScheduleNotFound: see :func:`scheduler_config_path`.
        BadSchedule: the config is unreadable, or its schedule gives no finite credit (a
            zero-terminal-SNR schedule, ᾱ_T = 0).
    """
    get_scheme(scheme)  # an unknown scheme is named before any file is read
    abar = _load_schedule(base_model)
    try:
        weight = credit_weights_array(scheme, abar)
        density = credit_distribution_array(scheme, abar)
    except UnknownCreditSchemeError:
        raise
    except ValueError as exc:
        raise BadSchedule(f"no credit for the schedule of {base_model!r}: {exc}") from None
    timesteps, weight_points = downsample(weight, points)
    _, density_points = downsample(density, points)
    return CreditCurve(
        scheme=scheme,
        base_model=base_model,
        num_train_timesteps=int(abar.shape[0]),
        timesteps=timesteps.tolist(),
        weight=weight_points.tolist(),
        density=density_points.tolist(),
    )
