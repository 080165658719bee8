"""bench.taste_rounds: its statistics and rules against hand-computed values (the full run is
a benchmark, not a test)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench import taste_rounds as tr


def test_paired_interval_by_hand():
    d = np.array([0.1, -0.1, 0.2, 0.0])
    mean, lo, hi = tr.paired_interval(d)
    sd = math.sqrt(((0.05**2) + (0.15**2) + (0.15**2) + (0.05**2)) / 3)  # mean 0.05
    assert mean == pytest.approx(0.05)
    assert hi - mean == pytest.approx(1.96 * sd / 2) and mean - lo == pytest.approx(hi - mean)


def test_units_never_use_a_vote_prompt_and_validation_is_not_test():
    votes, val, test = tr.prompt_splits()
    assert not set(votes) & set(val) and not set(votes) & set(test) and not set(val) & set(test)
    s = tr.Settings(units=300, split="test")
    prompts, seeds = tr.eval_units(s)
    assert len(prompts) == 300 and set(prompts) <= set(test)
    assert len(set(zip(prompts, seeds, strict=True))) == 300  # every unit distinct
    vp, _ = tr.eval_units(tr.Settings(units=40, split="validation"))
    assert set(vp) <= set(val)


def _cell(**kw):
    base = dict(
        taste="size",
        seed=0,
        mix="fidelity:1,size:1",
        votes=500,
        ties=3,
        pairs=400,
        heldout_pairs=70,
        steps=80,
        best_step=60,
        stop_reason=None,
        candidate=True,
        no_candidate_reason=None,
        heldout_acc=0.62,
        drift=0.1,
        probe_delta=-0.008,
        ab_wins=90,
        ab_losses=30,
        ab_ties=8,
        win_rate=0.734,
        win_lo=0.65,
        win_hi=0.80,
        utility_gain=0.3,
        taste_gain=0.01,
        judge_parent=0.68,
        judge_delta=-0.015,
        judge_lo=-0.02,
        judge_hi=-0.01,
        seconds=1.0,
    )
    base.update(kw)
    return tr.Cell(**base)


def test_the_goal_needs_every_part():
    assert _cell().meets_goal
    assert not _cell(win_rate=0.69).meets_goal  # below 0.70
    assert not _cell(win_lo=0.49).meets_goal  # interval reaches 0.5
    assert not _cell(judge_delta=-0.021).meets_goal  # the judge dropped more than 0.02
    assert not _cell(candidate=False).meets_goal  # the round refused a candidate
    table = tr.format_table([_cell(), _cell(seed=1, judge_delta=-0.05)])
    assert "goal met 1/2" in table and "0.73 [0.65, 0.80]" in table


def test_mix_spec_and_value_parsing():
    s = tr.Settings(taste_weight=0.5)
    assert s.mix_spec("brightness") == "fidelity:1,brightness:0.5"
    assert s.mix_spec("fidelity") == "fidelity:1"
    assert tr._parse_value("none") is None and tr._parse_value("3") == 3
    assert tr._parse_value("1e-3") == pytest.approx(1e-3) and tr._parse_value("dde") == "dde"
