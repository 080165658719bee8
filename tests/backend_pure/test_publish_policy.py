"""The pure parts of the publish policy: the metric rule and the first-decision replay."""

from __future__ import annotations

import math

import pytest

from backend.ab_test import ABSettings, ABTally, decide
from backend.models import ABState
from backend.services.ab_tests import first_decision, live_evaluation
from backend.services.publishing import METRIC_Z, metric_verdict

FAST = ABSettings(alpha=0.05, min_effect=0.3, budget=10, power=0.9)


def test_metric_policy_needs_the_lower_end_of_the_interval_above_the_margin() -> None:
    v = metric_verdict({"judge_delta": 0.05, "judge_delta_sem": 0.01}, 0.0)
    assert v.passes is True
    assert v.interval == pytest.approx((0.05 - METRIC_Z * 0.01, 0.05 + METRIC_Z * 0.01))
    # A positive mean is not enough: the interval reaches below 0.
    assert metric_verdict({"judge_delta": 0.02, "judge_delta_sem": 0.02}, 0.0).passes is False
    # The margin is a bar above zero.
    assert metric_verdict({"judge_delta": 0.05, "judge_delta_sem": 0.01}, 0.04).passes is False
    assert metric_verdict({"judge_delta": 0.05, "judge_delta_sem": 0.0}, 0.049).passes is True
    # No metric, or a broken one: no verdict.
    for metrics in [
        {},
        None,
        {"judge_delta": 0.1},
        {"judge_delta": math.nan, "judge_delta_sem": 0.1},
        {"judge_delta": True, "judge_delta_sem": 0.1},
        {"judge_delta": 0.1, "judge_delta_sem": -1.0},
    ]:
        assert metric_verdict(metrics, 0.0).passes is None


def test_first_decision_is_the_first_prefix_that_leaves_open() -> None:
    # 7 wins promote at δ = 0.3 (log 1.6 * 7 = 3.29 >= log 20 = 3.0); the losses after the
    # decision do not undo it.
    obs = ["win"] * 7 + ["loss"] * 10
    ev = first_decision(obs, FAST)
    assert ev.state == ABState.promote and ev.tally == ABTally(7, 0, 0) and ev.later_votes == 10
    assert decide(ABTally(6, 0, 0), FAST).state == "open"
    # Three losses reject; both-bad and skip are not observations.
    ev = first_decision(["both_bad", "loss", "skip", "loss", "loss", "win"], FAST)
    assert ev.state == ABState.reject and ev.tally == ABTally(0, 3, 0) and ev.later_votes == 1
    # The budget: inconclusive at 10 votes without a boundary.
    ev = first_decision(["win", "loss"] * 6, FAST)
    assert ev.state == ABState.inconclusive and ev.tally.votes == 10
    # Still open: the whole tally.
    ev = first_decision(["win", "tie"], FAST)
    assert ev.state == ABState.open and ev.tally == ABTally(1, 0, 1) and ev.decision is not None


def test_live_evaluation_rolls_back_only_on_a_significant_loss() -> None:
    assert live_evaluation(ABTally(5, 5, 0), FAST).state == ABState.open
    ev = live_evaluation(ABTally(0, 12, 0), FAST)
    assert ev.state == ABState.rollback and "significantly worse" in ev.reason
    assert ev.log_evalue is not None and ev.log_evalue >= FAST.log_upper


def test_metric_policy_on_real_models_uses_pickscore_else_clip_score() -> None:
    clip = {"clip_delta": 0.8, "clip_delta_sem": 0.2}  # CI [0.41, 1.19]
    v = metric_verdict(clip, 0.0)
    assert v.passes is True and v.name == "clip_delta" and v.as_dict()["name"] == "clip_delta"
    assert v.interval == pytest.approx((0.8 - METRIC_Z * 0.2, 0.8 + METRIC_Z * 0.2))
    assert "CLIP score delta +0.8000" in v.reason
    assert metric_verdict(clip, 0.5).passes is False  # the margin
    assert metric_verdict({"clip_delta": 0.3, "clip_delta_sem": 0.2}, 0.0).passes is False
    # PickScore is the preference metric: it decides, CLIP score is quoted for fidelity.
    both = {**clip, "pickscore_delta": 0.05, "pickscore_delta_sem": 0.04}
    v = metric_verdict(both, 0.0)
    assert v.name == "pickscore_delta" and v.passes is False
    assert "PickScore delta" in v.reason and "CLIP score delta +0.8000" in v.reason
    # The judge, when present (built-in model), comes first.
    v = metric_verdict({**both, "judge_delta": 0.05, "judge_delta_sem": 0.01}, 0.0)
    assert v.name == "judge_delta" and v.passes is True
    # A broken PickScore falls through to CLIP score; nothing usable: no verdict.
    v = metric_verdict({**clip, "pickscore_delta": math.nan, "pickscore_delta_sem": 0.1}, 0.0)
    assert v.name == "clip_delta"
    assert metric_verdict({"clip_delta": 0.1, "auto_metric_error": "x"}, 0.0).passes is None
