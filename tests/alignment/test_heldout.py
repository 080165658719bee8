"""Held-out evaluation, best-checkpoint selection, early stopping and the drift budget.

The pure rules (statistics, tracker, guards, split) are checked against hand-computed values;
the trainer's use of them on a tiny pixel model, with real training steps."""

from __future__ import annotations

import math

import pytest
import torch

from worker.alignment.config import TrainConfig
from worker.alignment.data import PreferencePair, split_by_prompt
from worker.alignment.guard import LN2, EvalTracker, LossSpikeGuard
from worker.alignment.holdout import fixed_timesteps, heldout_statistics
from worker.alignment.metrics import EvalMetrics

from .conftest import make_pairs


# ---------------------------------------------------------------------------- statistics
def test_heldout_statistics_by_hand():
    # pair 0: D_w = 1.0 - 1.5 = -0.5, D_l = 2.0 - 1.5 = +0.5 -> Δ = -1 (towards the winner)
    # pair 1: the policy equals the reference -> Δ = 0
    model = torch.tensor([[[1.0, 2.0]], [[1.5, 1.5]]])
    ref = torch.full((2, 1, 2), 1.5)
    change = torch.full((2, 1, 2), 0.1)
    s = heldout_statistics(model, ref, change, beta=2.0)  # β/2 = 1 -> logits 1 and 0
    assert s["accuracy"] == pytest.approx(0.75)  # 1 + 0.5 (a zero margin counts half)
    assert s["loss"] == pytest.approx((0.313262 + math.log(2)) / 2, abs=1e-6)
    assert s["margin"] == pytest.approx(0.5)
    assert s["drift"] == pytest.approx(0.4 / 6.0)  # Σ change / Σ ref error
    assert s["model_mse"] == pytest.approx(1.5)
    assert s["ref_mse"] == pytest.approx(1.5)


def test_heldout_statistics_average_the_draws_before_the_sigmoid():
    # two draws with Δ = -2 and +1: mean Δ = -0.5 -> accuracy 1, loss -log σ(0.5 β/2)
    model = torch.tensor([[[0.0, 2.0], [1.0, 0.0]]])
    ref = torch.zeros(1, 2, 2)
    s = heldout_statistics(model, ref + 0.0, torch.zeros(1, 2, 2), beta=4.0)
    assert s["accuracy"] == 1.0
    assert s["loss"] == pytest.approx(-math.log(1 / (1 + math.exp(-1.0))), abs=1e-9)


def test_fixed_timesteps_are_credit_quantiles():
    abar = torch.linspace(0.999, 0.01, 1000, dtype=torch.float64)
    ts = fixed_timesteps("uniform", abar, 4)
    # uniform p(k) = 1/1000: the (j - 1/2)/4 quantiles are k = 124, 374, 624, 874 (0-based)
    assert all(abs(int(a) - b) <= 1 for a, b in zip(ts, [124, 374, 624, 874], strict=True))
    dde = fixed_timesteps("dde", abar, 8)
    assert dde.tolist() == sorted(dde.tolist())
    # DDE's credit sits in the middle: its quantiles are nearer the centre than uniform's
    uni = fixed_timesteps("uniform", abar, 8)
    assert int(dde[0]) > int(uni[0]) and int(dde[-1]) < int(uni[-1])


# ---------------------------------------------------------------------------- the tracker
def _ev(step: int, loss: float, drift: float = 0.0, acc: float = 0.5) -> EvalMetrics:
    return EvalMetrics(step, acc, loss, 0.0, drift, 1.0, 1.0, 10)


def test_tracker_keeps_the_lowest_loss_and_stops_after_patience():
    t = EvalTracker(patience=2, min_delta=0.0, drift_budget=None)
    assert t.observe(_ev(0, LN2)) == (True, None)
    assert t.observe(_ev(10, 0.68)) == (True, None)
    assert t.observe(_ev(20, 0.67)) == (True, None)
    assert t.observe(_ev(30, 0.675)) == (False, None)  # 1 without improvement
    is_best, stop = t.observe(_ev(40, 0.69))  # 2: patience reached
    assert not is_best and stop is not None and "not improved for 2" in stop
    assert t.best is not None and t.best.step == 20


def test_tracker_min_delta_and_no_patience():
    t = EvalTracker(patience=0, min_delta=0.01)
    t.observe(_ev(0, 0.70))
    assert t.observe(_ev(5, 0.695)) == (False, None)  # better, but by less than min_delta
    assert t.observe(_ev(10, 0.685)) == (True, None)  # 0.015 better than 0.70
    for step in range(15, 200, 5):  # patience 0: never stops
        assert t.observe(_ev(step, 0.9))[1] is None
    assert t.best is not None and t.best.step == 10


def test_tracker_drift_budget_stops_and_keeps_the_last_best_within_budget():
    t = EvalTracker(patience=0, drift_budget=0.25)
    t.observe(_ev(0, LN2, 0.0))
    t.observe(_ev(10, 0.60, 0.1))
    t.observe(_ev(20, 0.62, 0.2))  # within budget, not better
    is_best, stop = t.observe(_ev(30, 0.40, 0.3))  # much better loss, but over budget
    assert not is_best
    assert stop is not None and "above the budget 0.25" in stop and "keeping step 10" in stop
    assert t.best is not None and t.best.step == 10


def test_tracker_state_round_trips():
    t = EvalTracker(patience=3)
    for e in (_ev(0, 0.69), _ev(5, 0.6), _ev(10, 0.65)):
        t.observe(e)
    u = EvalTracker(patience=3)
    u.load_state_dict(t.state_dict())
    assert u.evals == t.evals and u.best_index == t.best_index and u.since_best == 1


# ---------------------------------------------------------------------------- the chance guard
def test_loss_above_chance_for_too_long_stops_the_run():
    g = LossSpikeGuard(None, window=5, min_history=3, max_consecutive=5, above_chance_limit=4)
    # the running mean is known from the 3rd loss on: steps 3, 4, 5 count 1..3, step 6 counts 4
    assert [g.observe(0.70) for _ in range(5)] == [None] * 5
    reason = g.observe(0.70)
    assert reason is not None and "above ln 2" in reason and "4 steps" in reason


def test_loss_below_chance_resets_the_count():
    g = LossSpikeGuard(None, window=2, min_history=2, max_consecutive=5, above_chance_limit=3)
    seq = [0.70, 0.70, 0.70, 0.60, 0.60, 0.70, 0.70]
    # means over the last 2: -, .70 (1), .70 (2), .65 (reset), .60, .65, .70 (1)
    assert all(g.observe(x) is None for x in seq)
    assert g.above_chance == 1


# ---------------------------------------------------------------------------- the split
def _prompt_pairs(prompts: list[str], per: int) -> list[PreferencePair]:
    import numpy as np

    img = np.zeros((4, 4, 3), np.uint8)
    return [PreferencePair(p, img, img) for p in prompts for _ in range(per)]


def test_split_by_prompt_never_leaks_a_prompt():
    pairs = _prompt_pairs([f"prompt {i}" for i in range(40)], 3) + _prompt_pairs(["odd"], 7)
    train, held = split_by_prompt(pairs, 0.15, seed=3)
    assert len(train) + len(held) == len(pairs)
    assert not {p.prompt for p in train} & {p.prompt for p in held}
    assert len(held) >= round(0.15 * len(pairs))  # whole prompts until the target is reached
    assert len(held) <= round(0.15 * len(pairs)) + 7
    again = split_by_prompt(pairs, 0.15, seed=3)
    assert [p.prompt for p in again[1]] == [p.prompt for p in held]  # deterministic
    other = split_by_prompt(pairs, 0.15, seed=4)
    assert {p.prompt for p in other[1]} != {p.prompt for p in held}


def test_split_by_prompt_edge_cases():
    pairs = _prompt_pairs(["only one"], 10)
    assert split_by_prompt(pairs, 0.5) == (pairs, [])  # one prompt: nothing to hold out
    two = _prompt_pairs(["a", "b"], 5)
    train, held = split_by_prompt(two, 0.8)
    assert len(train) == 5 and len(held) == 5  # the training side keeps one prompt
    assert split_by_prompt(two, 0.0) == (two, [])
    with pytest.raises(ValueError, match="fraction"):
        split_by_prompt(two, 1.0)


# ---------------------------------------------------------------------------- in the trainer
def _config(**kw) -> TrainConfig:
    base = dict(
        steps=12,
        batch_size=4,
        learning_rate=1e-2,
        beta=500.0,
        eval_every=3,
        eval_timesteps=4,
        checkpoint_every=0,
        drift_budget=None,
        early_stopping_patience=0,
        max_steps_above_chance=None,
    )
    base.update(kw)
    return TrainConfig(**base)


def test_the_written_adapter_is_the_best_evaluation(tiny_pixel, tmp_path):
    from worker.alignment.adapters import adapter_state_dict, read_adapter_file
    from worker.alignment.trainer import train

    train_pairs, held = split_by_prompt(make_pairs(48), 0.25, seed=0)
    snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def on_eval(m: EvalMetrics) -> None:
        if m.step:
            snapshots[m.step] = {
                k: v.clone() for k, v in adapter_state_dict(tiny_pixel.unet).items()
            }

    r = train(
        tiny_pixel, train_pairs, _config(), output_dir=tmp_path, heldout=held, on_eval=on_eval
    )
    losses = {e.step: e.loss for e in r.evals}
    assert [e.step for e in r.evals] == [0, 3, 6, 9, 12]
    assert r.evals[0].accuracy == 0.5 and r.evals[0].loss == pytest.approx(LN2)
    assert r.evals[0].drift == 0.0
    assert r.best_step == min(losses, key=losses.get)
    assert r.best_eval is not None and r.best_eval.loss == min(losses.values())
    saved, _ = read_adapter_file(r.adapter_path)
    if r.best_step:
        want = snapshots[r.best_step]
        assert {k.removeprefix("unet.") for k in saved} == set(want)
        for k, v in saved.items():
            torch.testing.assert_close(v, want[k.removeprefix("unet.")].to(v.dtype))
    else:
        assert all(float(v.abs().max()) == 0.0 for k, v in saved.items() if "lora_B" in k)


def test_early_stopping_stops_when_the_heldout_loss_stops_improving(tiny_pixel, tmp_path):
    from worker.alignment.trainer import train

    train_pairs, held = split_by_prompt(make_pairs(48), 0.25, seed=0)
    # a min_delta no evaluation can beat: the reference stays best and patience 2 stops at step 4
    cfg = _config(steps=40, eval_every=2, early_stopping_patience=2, early_stopping_min_delta=10.0)
    r = train(tiny_pixel, train_pairs, cfg, output_dir=tmp_path, heldout=held)
    assert r.steps == 4 and len(r.history) == 4
    assert r.best_step == 0
    assert r.stop_reason is not None and "not improved for 2 evaluations" in r.stop_reason


def test_drift_budget_stops_a_run_at_lr_1e2_before_it_drifts_away(tiny_pixel, tmp_path):
    """lr 1e-2 on a random-image task drifts fast; the budget stops it and keeps the last
    evaluation within budget, whose drift (re-measured on the written weights) is <= budget."""
    from worker.alignment.trainer import train

    train_pairs, held = split_by_prompt(make_pairs(48), 0.25, seed=0)
    free = train(
        tiny_pixel,
        train_pairs,
        _config(steps=30, eval_every=3, learning_rate=3e-2),
        output_dir=tmp_path / "free",
        heldout=held,
    )
    drifts = [e.drift for e in free.evals]
    assert drifts[-1] > drifts[1] > 0  # it keeps drifting without a budget
    budget = (drifts[1] + drifts[-1]) / 2

    from worker.alignment.tiny_models import build_tiny_pixel_backbone

    fresh = build_tiny_pixel_backbone(seed=0, resolution=16)
    capped = train(
        fresh,
        train_pairs,
        _config(steps=30, eval_every=3, learning_rate=3e-2, drift_budget=budget),
        output_dir=tmp_path / "capped",
        heldout=held,
    )
    assert capped.stop_reason is not None and "above the budget" in capped.stop_reason
    assert capped.steps < 30
    assert capped.evals[-1].drift > budget  # the evaluation that stopped it
    kept = capped.best_eval
    assert kept is not None and kept.drift <= budget and kept.step < capped.steps
