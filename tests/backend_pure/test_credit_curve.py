"""Where the API finds a base model's noise schedule, and the plot's downsampling
(``backend/credit_curve.py``; the route is tested in tests/backend/test_credit_curve.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from backend.credit_curve import (
    BadSchedule,
    ScheduleNotFound,
    credit_curve,
    downsample,
    scheduler_config_path,
)
from worker.alignment.credit import UnknownCreditSchemeError

REPO_ROOT = Path(__file__).resolve().parents[2]


def _write_config(root: Path, **config: object) -> Path:
    path = root / "scheduler" / "scheduler_config.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(config))
    return path


def test_the_builtin_model_is_the_shipped_checkpoint():
    expected = (
        REPO_ROOT / "worker" / "shapes" / "checkpoint" / "scheduler" / "scheduler_config.json"
    )
    assert scheduler_config_path("builtin:shapes").resolve() == expected.resolve()


def test_a_local_directory_and_a_hub_id_in_the_local_cache(tmp_path, monkeypatch):
    local = _write_config(tmp_path / "local", beta_schedule="linear")
    assert scheduler_config_path(str(tmp_path / "local")) == local
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    repo = cache / "models--someone--sd-tiny"
    old = _write_config(repo / "snapshots" / "0ld", beta_schedule="linear")
    main = _write_config(repo / "snapshots" / "abc123", beta_schedule="scaled_linear")
    with pytest.raises(ScheduleNotFound):
        scheduler_config_path("someone/absent")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123\n")
    assert scheduler_config_path("someone/sd-tiny") == main  # refs/main first
    (repo / "refs" / "main").write_text("gone\n")
    assert scheduler_config_path("someone/sd-tiny") in (old, main)  # any snapshot
    for name in ("../x", "a/b/c", "someone/..", "x\x00y"):
        with pytest.raises(ScheduleNotFound):
            scheduler_config_path(name)


def test_downsample_averages_runs_at_their_middle():
    values = np.arange(10, dtype=np.float64)
    t, v = downsample(values, 3)
    assert t.tolist() == [1.0, 4.5, 8.0] and v.tolist() == [1.0, 4.5, 8.0]  # runs 3, 4, 3
    t, v = downsample(values, 20)
    assert t.tolist() == list(range(10)) and v.tolist() == values.tolist()
    # equal runs keep the mean: a mean-1 weight stays mean 1
    w = np.random.default_rng(0).random(1000)
    w *= 1000 / w.sum()
    assert downsample(w, 100)[1].mean() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        downsample(values, 0)


def test_errors(tmp_path):
    with pytest.raises(UnknownCreditSchemeError, match="known schemes: dde"):
        credit_curve("magic", str(tmp_path / "nothing"))  # named before any file is read
    big = _write_config(tmp_path / "big")
    big.write_text(json.dumps({"trained_betas": [0.01] * 200_000}))
    with pytest.raises(BadSchedule, match="larger than"):
        credit_curve("dde", str(tmp_path / "big"))
