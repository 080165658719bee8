"""The fidelity probe (worker.alignment.fidelity) and its budget: by hand, then in the trainer
and in the round's construction of it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from worker.alignment.data import split_by_prompt
from worker.alignment.fidelity import FidelityProbe, probe_units
from worker.alignment.guard import LN2, EvalTracker
from worker.alignment.metrics import EvalMetrics

from .conftest import make_pairs
from .test_heldout import _config


def _constant_sampler(values: list[float]):
    """A sampler whose image i is filled with values[i] (2x2x3)."""

    def sample(prompts: list[str], seeds: list[int]) -> np.ndarray:
        assert len(prompts) == len(seeds) == len(values)
        return np.stack([np.full((2, 2, 3), v, np.float64) for v in values])

    return sample


def _mean_pixel(images: np.ndarray, prompts: list[str]) -> np.ndarray:
    return images.reshape(len(images), -1).mean(axis=1)


def test_probe_reads_the_paired_change_by_hand():
    probe = FidelityProbe(["a", "b", "c"], [1, 2, 3], _mean_pixel)
    with pytest.raises(RuntimeError, match="set_reference"):
        probe.read(_constant_sampler([0, 0, 0]))
    probe.set_reference(_constant_sampler([1.0, 2.0, 3.0]))
    r = probe.read(_constant_sampler([1.5, 1.0, 3.0]))
    # differences +0.5, -1.0, 0.0: mean -1/6; sample sd sqrt(((2/3)^2+(5/6)^2+(1/6)^2)/2)
    assert r.delta == pytest.approx(-1 / 6)
    sd = math.sqrt(((0.5 + 1 / 6) ** 2 + (-1.0 + 1 / 6) ** 2 + (1 / 6) ** 2) / 2)
    assert r.sem == pytest.approx(sd / math.sqrt(3))
    assert r.score == pytest.approx(5.5 / 3)
    same = probe.read(_constant_sampler([1.0, 2.0, 3.0]))
    assert same.delta == 0.0 and same.sem == 0.0


def test_probe_rejects_bad_scores_and_units():
    with pytest.raises(ValueError, match="at least one unit"):
        FidelityProbe([], [], _mean_pixel)
    with pytest.raises(ValueError, match="2 prompts but 1 seeds"):
        FidelityProbe(["a", "b"], [1], _mean_pixel)
    bad = FidelityProbe(["a", "b"], [1, 2], lambda im, p: np.array([1.0, float("nan")]))
    with pytest.raises(ValueError, match="non-finite"):
        bad.set_reference(_constant_sampler([0, 0]))
    short = FidelityProbe(["a", "b"], [1, 2], lambda im, p: np.array([1.0]))
    with pytest.raises(ValueError, match=r"shape \(1,\)"):
        short.set_reference(_constant_sampler([0, 0]))


def test_probe_units_cycle_the_distinct_prompts_with_fixed_seeds():
    prompts, seeds = probe_units(["b", "a", "b", "c"], 5, seed=7)
    assert prompts == ["a", "b", "c", "a", "b"]
    again = probe_units(["c", "b", "a"], 5, seed=7)  # order and repeats do not matter
    assert again == (prompts, seeds)
    assert len(set(seeds)) == 5 and all(0 <= s < 2**31 - 1 for s in seeds)
    assert probe_units(["a"], 5, seed=8)[1] != seeds
    assert probe_units([], 5, seed=7) == ([], [])


def _ev(step: int, loss: float, fidelity: float | None) -> EvalMetrics:
    return EvalMetrics(step, 0.5, loss, 0.0, 0.0, 1.0, 1.0, 10, fidelity=fidelity)


def test_tracker_fidelity_budget_stops_and_keeps_the_last_best_within_it():
    t = EvalTracker(patience=0, fidelity_budget=0.02)
    assert t.observe(_ev(0, LN2, 0.0)) == (True, None)
    assert t.observe(_ev(10, 0.60, -0.005)) == (True, None)
    assert t.observe(_ev(20, 0.58, -0.02)) == (True, None)  # exactly at the budget: kept
    is_best, stop = t.observe(_ev(30, 0.40, -0.021))
    assert not is_best
    assert stop is not None and "fell by 0.021" in stop and "keeping step 20" in stop
    assert t.best is not None and t.best.step == 20
    # no reading (a run without a probe) never stops on fidelity
    u = EvalTracker(patience=0, fidelity_budget=0.0)
    assert u.observe(_ev(0, LN2, None)) == (True, None)
    assert u.observe(_ev(10, 0.5, None)) == (True, None)


def test_tracker_fidelity_patience_lets_one_noisy_reading_pass():
    """With fidelity_patience 2, one reading past the budget is skipped (never kept) and the run
    goes on; a reading back within budget resets the count; two in a row stop it. The state
    survives a checkpoint round trip."""
    t = EvalTracker(patience=0, fidelity_budget=0.01, fidelity_patience=2)
    assert t.observe(_ev(0, LN2, 0.0)) == (True, None)
    assert t.observe(_ev(10, 0.60, -0.011)) == (False, None)  # past: not kept, not stopped
    assert t.best is not None and t.best.step == 0
    assert t.observe(_ev(20, 0.59, -0.009)) == (True, None)  # back within: kept, count reset
    assert t.observe(_ev(30, 0.50, -0.012)) == (False, None)
    resumed = EvalTracker(patience=0, fidelity_budget=0.01, fidelity_patience=2)
    resumed.load_state_dict(t.state_dict())
    assert resumed.over_fidelity == 1
    is_best, stop = resumed.observe(_ev(40, 0.45, -0.013))
    assert not is_best and stop is not None
    assert "fell by 0.013 at step 40" in stop and "2 readings in a row" in stop
    assert "keeping step 20" in stop
    # the early-stopping count sees skipped readings as evaluations that did not improve
    e = EvalTracker(patience=2, fidelity_budget=0.01, fidelity_patience=3)
    assert e.observe(_ev(0, LN2, 0.0)) == (True, None)
    assert e.observe(_ev(10, 0.5, -0.02)) == (False, None)
    _, stop = e.observe(_ev(20, 0.9, 0.0))
    assert stop is not None and "not improved for 2 evaluations" in stop


def test_the_trainer_reads_the_probe_and_its_budget_stops_the_run(tiny_pixel, tmp_path):
    """The probe's reference is the run's own: at step 0 its change is exactly 0. A scorer that
    punishes any change of the images (against the reference's) falls as soon as the policy
    moves, and a zero budget stops the run there, keeping the last evaluation within it."""
    from worker.alignment.trainer import train

    train_pairs, held = split_by_prompt(make_pairs(48), 0.25, seed=0)
    first: dict[str, np.ndarray] = {}

    def unchanged(images: np.ndarray, prompts: list[str]) -> np.ndarray:
        images = images.astype(np.float64)
        ref = first.setdefault("ref", images)  # the first call scores the reference
        return -np.abs(images - ref).reshape(len(images), -1).mean(axis=1)

    prompts, seeds = probe_units([p.prompt for p in held], 6, seed=0)
    probe = FidelityProbe(prompts, seeds, unchanged, name="unchanged", num_inference_steps=4)
    r = train(
        tiny_pixel,
        train_pairs,
        _config(steps=30, eval_every=3, learning_rate=3e-2, fidelity_budget=0.0),
        output_dir=tmp_path,
        heldout=held,
        fidelity_probe=probe,
    )
    assert r.evals[0].step == 0 and r.evals[0].fidelity == 0.0
    assert r.evals[-1].fidelity is not None and r.evals[-1].fidelity < 0
    assert r.stop_reason is not None and "fidelity fell by" in r.stop_reason
    assert r.steps < 30
    assert r.best_eval is not None and r.best_eval.fidelity == 0.0


def test_the_round_builds_the_family_probe():
    from backend.round_config import resolve_config
    from worker.alignment.data import PreferencePair
    from worker.round_state import RoundFailed
    from worker.rounds import fidelity_probe_for
    from worker.shapes.judge import judge_batch

    img = np.zeros((4, 4, 3), np.uint8)
    held = [PreferencePair(p, img, img) for p in ("a red circle", "a blue square")]
    off = resolve_config({"fidelity_budget": None}, "builtin:shapes")
    assert fidelity_probe_for("builtin:shapes", off, held) is None
    rc = resolve_config({"fidelity_budget": 0.01, "fidelity_units": 4}, "builtin:shapes")
    probe = fidelity_probe_for("builtin:shapes", rc, held)
    assert probe.name == "judge" and probe.score is judge_batch
    assert probe.prompts == ["a blue square", "a red circle"] * 2
    assert fidelity_probe_for("builtin:shapes", rc, []) is None  # nothing held out
    sd = resolve_config({"fidelity_budget": 0.01}, "some/sd-model")
    with pytest.raises(RoundFailed, match="PREFLOOP_CLIP_MODEL_PATH"):
        fidelity_probe_for("some/sd-model", sd, held)
