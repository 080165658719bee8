"""Tests of bench/alignment.py: its statistics helpers (hand-computed values) and a tiny run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from bench import alignment as ab


# ------------------------------------------------------------------------------- win rate
def test_win_rate_counts_ties_half() -> None:
    a = np.array([1.0, 2.0, 3.0, 4.0])
    b = np.array([0.0, 2.0, 5.0, 1.0])
    # win, tie, loss, win -> (1 + 0.5 + 0 + 1) / 4
    assert ab.win_rate(a, b) == pytest.approx(0.625)
    assert ab.win_indicator(a, b).tolist() == [1.0, 0.5, 0.0, 1.0]


def test_win_rate_all_ties_is_half_and_is_antisymmetric() -> None:
    x = np.array([0.3, 0.7, 0.1])
    assert ab.win_rate(x, x) == 0.5
    a, b = np.array([0.2, 0.9, 0.4]), np.array([0.1, 0.9, 0.6])
    assert ab.win_rate(a, b) + ab.win_rate(b, a) == pytest.approx(1.0)


def test_win_indicator_broadcasts_seeds_against_one_base() -> None:
    trained = np.array([[0.5, 0.2], [0.1, 0.2]])  # 2 seeds x 2 units
    base = np.array([[0.3, 0.2]])
    assert ab.win_indicator(trained, base).tolist() == [[1.0, 0.5], [0.0, 0.5]]
    assert ab.bootstrap_mean(ab.win_indicator(trained, base), n_boot=200).mean == pytest.approx(0.5)


# ------------------------------------------------------------------------------- bootstrap
def test_bootstrap_two_units_hand_computed() -> None:
    # units 0 and 1: a resample of 2 units has mean 0 (p=1/4), 0.5 (p=1/2) or 1 (p=1/4), so the
    # 2.5% and 97.5% quantiles of the replicates are 0 and 1, and the mean is 0.5.
    est = ab.bootstrap_mean(np.array([0.0, 1.0]), n_boot=4000, seed=0)
    assert est.mean == 0.5
    assert est.lo == 0.0
    assert est.hi == 1.0


def test_bootstrap_resamples_seeds_too() -> None:
    # 2 seeds x 1 unit: the same distribution as above, now over the seeds.
    est = ab.bootstrap_mean(np.array([[0.0], [1.0]]), n_boot=4000, seed=0)
    assert (est.mean, est.lo, est.hi) == (0.5, 0.0, 1.0)
    # a seed-level spread must widen the interval: with identical units it is all seed noise
    wide = ab.bootstrap_mean(np.array([[0.0] * 50, [1.0] * 50]), n_boot=4000, seed=0)
    assert (wide.lo, wide.hi) == (0.0, 1.0)


def test_bootstrap_constant_gives_a_point_interval() -> None:
    est = ab.bootstrap_mean(np.full((3, 10), 0.25), n_boot=500)
    assert (est.mean, est.lo, est.hi) == pytest.approx((0.25, 0.25, 0.25))


def test_paired_difference_uses_the_pairing() -> None:
    # unit-level spread is large, but every unit improves by exactly 0.1: a paired interval is
    # the point 0.1; an unpaired one would span most of [-0.7, 0.9].
    base = np.array([0.1, 0.9, 0.5, 0.2])
    trained = base + 0.1
    est = ab.paired_difference(trained[None, :], base[None, :], n_boot=1000)
    assert (est.mean, est.lo, est.hi) == pytest.approx((0.1, 0.1, 0.1))
    # broadcasting 3 seeds against one base row
    trained3 = np.stack([base + 0.1, base + 0.2, base + 0.3])
    est3 = ab.paired_difference(trained3, base[None, :], n_boot=4000, seed=1)
    assert est3.mean == pytest.approx(0.2)
    # only the seeds vary: a replicate's mean is the mean of 3 draws from {0.1, 0.2, 0.3}; all
    # three draws are 0.1 with p = 1/27 > 2.5% (likewise 0.3), so the interval is [0.1, 0.3]
    assert (est3.lo, est3.hi) == pytest.approx((0.1, 0.3))


def test_paired_difference_hand_computed_sign() -> None:
    a = np.array([[0.6, 0.4]])
    b = np.array([[0.5, 0.5]])
    # differences +0.1 and -0.1: resampled means -0.1, 0, 0.1 with p 1/4, 1/2, 1/4
    est = ab.paired_difference(a, b, n_boot=4000, seed=0)
    assert est.mean == pytest.approx(0.0)
    assert (est.lo, est.hi) == pytest.approx((-0.1, 0.1))


def test_bootstrap_is_deterministic_and_checks_input() -> None:
    x = np.random.default_rng(0).normal(size=(3, 40))
    assert ab.bootstrap_mean(x, seed=3) == ab.bootstrap_mean(x, seed=3)
    with pytest.raises(ValueError):
        ab.bootstrap_mean(np.array([[np.nan, 1.0]]))
    with pytest.raises(ValueError):
        ab.bootstrap_mean(np.zeros((0, 3)))


def test_curve_steps() -> None:
    assert ab.curve_steps(120, 4) == [30, 60, 90, 120]
    assert ab.curve_steps(5, 10) == [1, 2, 3, 4, 5]
    assert ab.curve_steps(7, 1) == [7]


def test_ascii_curve_and_table_render() -> None:
    curves = {
        "dde": [
            {"step": 0, "mean": 0.5, "lo": 0.4, "hi": 0.6},
            {"step": 10, "mean": 0.7, "lo": 0.6, "hi": 0.8},
        ],
        "uniform": [
            {"step": 0, "mean": 0.5, "lo": 0.4, "hi": 0.6},
            {"step": 10, "mean": 0.6, "lo": 0.5, "hi": 0.7},
        ],
    }
    text = ab.ascii_curve(curves)
    assert "D" in text and "U" in text and "*" in text  # step 0 is shared: overlap marker


def test_win_indicator_with_a_tie_margin() -> None:
    a = np.array([1.0, 1.05, 0.9, 2.0])
    b = np.array([1.0, 1.0, 1.0, 1.0])
    # |a - b| <= 0.1 is a tie: tie, tie, tie, win
    assert ab.win_indicator(a, b, margin=0.1).tolist() == [0.5, 0.5, 0.5, 1.0]
    assert ab.win_rate(a, b, margin=0.1) == pytest.approx(0.625)
    assert ab.win_indicator(a, b).tolist() == [0.5, 1.0, 0.0, 1.0]  # margin 0: a == b only


def test_timestep_modes_are_the_trainers() -> None:
    from worker.alignment.credit import SAMPLING_MODES

    assert ab.TIMESTEP_MODES == tuple(SAMPLING_MODES)


def test_settings_validate() -> None:
    with pytest.raises(ValueError):
        ab.BenchSettings(label_noise=0.6)
    with pytest.raises(ValueError):
        ab.BenchSettings(steps=0)
    with pytest.raises(ValueError, match="unknown taste"):
        ab.BenchSettings(tastes=("fidelity:1,sparkle:1",))
    with pytest.raises(ValueError, match="twice"):
        ab.BenchSettings(tastes=("fidelity", "fidelity:1"))  # the same mix, written two ways
    with pytest.raises(ValueError, match="timestep modes"):
        ab.BenchSettings(timestep_modes=("importance", "sideways"))
    s, out, threads, workers = ab.parse_args(
        ["--quick", "--schemes", "dde,uniform", "--out", "/tmp/x"]
    )
    assert s.quick and s.schemes == ("dde", "uniform") and out == Path("/tmp/x")
    assert s.tastes == ("fidelity:1",) and s.timestep_modes == ("importance",)
    assert (threads, workers) == (1, 1)


def test_taste_and_mode_flags() -> None:
    s, _, _, _ = ab.parse_args(
        [
            "--tastes",
            "fidelity:1,brightness:1; fidelity,size:0.5",
            "--tastes",
            "centred",
            "--timestep-modes",
            "importance,weighted,importance-corrected",
            "--label-noise",
            "0.2",
        ]
    )
    assert s.tastes == ("fidelity:1,brightness:1", "fidelity:1,size:0.5", "centred:1")
    assert s.timestep_modes == ("importance", "weighted", "importance-corrected")
    assert ab.mix_of(s, s.tastes[0]).noise == 0.2
    with pytest.raises(SystemExit):
        ab.parse_args(["--tastes", "fidelity:1,sparkle:1"])
    with pytest.raises(SystemExit):
        ab.parse_args(["--timestep-modes", "uniformly"])


def test_job_list_runs_uniform_credit_once() -> None:
    s = ab.BenchSettings(
        seeds=2,
        schemes=("dde", "uniform"),
        tastes=("fidelity:1", "fidelity:1,brightness:1"),
        timestep_modes=("weighted", "importance-corrected"),
    )
    jobs = ab.job_list(s)
    # per taste and seed: dde in both modes, uniform once (W = 1: every mode is one objective)
    assert len(jobs) == 2 * 2 * 3
    assert {j.mode for j in jobs if j.scheme == "uniform"} == {"importance"}
    assert {j.mode for j in jobs if j.scheme == "dde"} == {"weighted", "importance-corrected"}
    assert len(set(jobs)) == len(jobs)


def test_training_config_has_the_products_guards_and_selection_off() -> None:
    cfg = ab.train_config(ab.BenchSettings(), "dde", 0, "importance-corrected")
    assert cfg.timestep_mode == "importance-corrected"
    assert cfg.early_stopping_patience == 0 and cfg.drift_budget is None
    assert cfg.max_steps_above_chance is None and cfg.eval_every == 0
    assert cfg.loss_spike_factor is None and cfg.max_median_loss is None


def test_cache_keys_differ_by_mix_mode_and_rounds(tmp_path: Path) -> None:
    s = ab.BenchSettings(
        tastes=("fidelity:1", "fidelity:1,brightness:1"),
        timestep_modes=("importance", "weighted"),
        rounds=4,
        candidates=3,
    )
    plain, bright = s.tastes
    # the judge-only mix keeps the dataset key (and cache file) of before the taste axis
    assert "taste" not in ab.data_key(s, "f", plain)
    assert ab.data_key(s, "f", plain) != ab.data_key(s, "f", bright)
    assert ab.data_key(s, "f", bright) != ab.data_key(s, "f", "fidelity:1,brightness:2")
    assert ab.data_key(s, "f") != ab.data_key(s.replace(candidates=2), "f")
    job = ab.Job(plain, "dde", "importance", 0)
    key = ab.run_key(s, job, {}, {})
    assert key != ab.run_key(s, job._replace(mode="weighted"), {}, {})
    assert key != ab.run_key(s, job._replace(taste=bright), {}, {})
    assert key != ab.run_key(s.replace(rounds=1), job, {}, {})
    paths = ab.run_paths(s, "f", tmp_path)
    assert len(set(paths.values())) == len(paths) == len(ab.job_list(s))
    assert all(p.parent == tmp_path / "runs" for p in paths.values())
    # the evaluation and drift keys do not depend on the taste: the base is scored once
    assert ab.eval_key(s, "f") == ab.eval_key(s.replace(tastes=(bright,)), "f")


def test_round_steps_split_evenly_longer_rounds_first() -> None:
    assert ab.round_steps(10, 3) == [4, 3, 3]
    assert ab.round_steps(100, 1) == [100]
    assert ab.round_steps(5, 5) == [1, 1, 1, 1, 1]
    with pytest.raises(ValueError, match="rounds"):
        ab.BenchSettings(steps=3, rounds=4)
    with pytest.raises(ValueError, match="candidates"):
        ab.BenchSettings(candidates=1)
    s, _, _, _ = ab.parse_args(["--rounds", "4", "--candidates", "3"])
    assert (s.rounds, s.candidates) == (4, 3)


# ------------------------------------------------------------------------------- tastes
def _grey(level: float) -> np.ndarray:
    return np.full((8, 8, 3), int(round(level * 250)), dtype=np.uint8)


def test_mix_utility_from_stored_scores_matches_the_mix() -> None:
    from worker.shapes import world
    from worker.shapes.tastes import TasteMix

    rng = np.random.default_rng(0)
    prompts = list(world.split_prompts(0)[0][:6])
    images = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    scores = ab.taste_scores(images, prompts)
    assert set(scores) >= {"fidelity", "brightness", "size", "centred", "warmth"}
    mix = TasteMix.parse("fidelity:1,brightness:0.5,size:2")
    np.testing.assert_allclose(ab.mix_utility(mix, scores), mix.utilities(images, prompts))
    only = ab.mix_utility(mix, scores, exclude=["fidelity"])
    np.testing.assert_allclose(
        only, 0.5 * scores["brightness"] / 0.014 + 2 * scores["size"] / 0.0062
    )
    assert ab.other_tastes(mix) == ["brightness", "size"]
    assert not ab.mix_utility(TasteMix.parse("fidelity"), scores, exclude=["fidelity"]).any()


def test_a_brightness_mix_labels_the_brighter_image_the_winner(monkeypatch) -> None:
    # Synthetic grey images whose brightness is known; a brightness mix with no label noise
    # must label the brighter image of every pair the winner, whatever the judge says.
    from worker.shapes.tastes import TasteMix

    levels = np.random.default_rng(1).permutation(40) / 40 * 0.9 + 0.05  # distinct

    def fake_sample_and_judge(backbone, prompts, seeds, settings):
        lv = np.array([levels[s % 40] for s in seeds])
        images = np.stack([_grey(x) for x in lv])
        return images, 1.0 - lv  # the judge prefers the darker one: the taste must overrule it

    monkeypatch.setattr(ab, "sample_and_judge", fake_sample_and_judge)
    settings = ab.BenchSettings(pairs=12, label_noise=0.0)
    mix = TasteMix.parse("brightness:1", noise=0.0)
    data = ab.sample_pairs(settings, mix, None, [5], 0, lambda m: None)
    assert len(data.prompts) == 12 and not data.flipped.any()
    assert (data.winners.mean(axis=(1, 2, 3)) > data.losers.mean(axis=(1, 2, 3))).all()
    assert data.stats["label_agrees_with_judge"] == 0.0
    assert data.stats["taste"] == "brightness:1"
    # with label noise, exactly the flipped votes prefer the darker image
    noisy = ab.sample_pairs(
        settings, TasteMix.parse("brightness:1", noise=0.4), None, [5], 0, lambda m: None
    )
    brighter = noisy.winners.mean(axis=(1, 2, 3)) > noisy.losers.mean(axis=(1, 2, 3))
    assert noisy.flipped.any() and (brighter == ~noisy.flipped).all()


def test_the_judge_only_mix_votes_as_the_judge() -> None:
    # fidelity:1 is today's annotator: its datasets keep their cache key
    from worker.shapes import judge, world
    from worker.shapes.tastes import TasteMix

    mix = TasteMix.parse(ab.DEFAULT_TASTE)
    rng = np.random.default_rng(3)
    prompts = world.split_prompts(0)[0][:20]
    for p in prompts:
        a = world.render(world.parse_prompt(p), rng=rng)
        b = np.clip(a.astype(int) + rng.integers(-90, 90, a.shape), 0, 255).astype(np.uint8)
        assert mix.prefer(a, b, p) == judge.prefer(a, b, p)


def test_sample_pairs_takes_the_best_and_worst_of_the_candidates(monkeypatch) -> None:
    # Candidate c of the j-th prompt drawn has a known brightness; a brightness mix (no noise)
    # must pair, per prompt, the brightest candidate (winner) with the darkest (loser).
    from worker.shapes.tastes import TasteMix

    k, n = 4, 6
    table = (np.random.default_rng(0).permutation(k * n).reshape(n, k) + 1) / (k * n + 2)
    calls: list[list[int]] = []

    def fake_sample_and_judge(backbone, prompts, seeds, settings):
        calls.append(list(seeds))
        idx = [(s - 500) // k for s in seeds], [(s - 500) % k for s in seeds]
        scores = np.array([table[j % n, c] for j, c in zip(*idx, strict=True)])
        return np.stack([_grey(x) for x in scores]), scores

    monkeypatch.setattr(ab, "sample_and_judge", fake_sample_and_judge)
    settings = ab.BenchSettings(pairs=n, candidates=k, label_noise=0.0)
    mix = TasteMix.parse("brightness", noise=0.0)
    data = ab.sample_pairs(settings, mix, None, [3], 500, lambda m: None)

    assert len(data.prompts) == n and data.stats["ties_dropped"] == 0
    assert not data.flipped.any()
    # every candidate of the j-th prompt was sampled with seed 500 + k j + c
    assert sorted(calls[0]) == [
        500 + k * j + c for j in range(len(calls[0]) // k) for c in range(k)
    ]
    np.testing.assert_allclose(data.winner_scores, table.max(axis=1))
    np.testing.assert_allclose(data.loser_scores, table.min(axis=1))
    np.testing.assert_array_equal(
        data.winners[:, 0, 0, 0], [_grey(x)[0, 0, 0] for x in table.max(1)]
    )
    np.testing.assert_array_equal(
        data.losers[:, 0, 0, 0], [_grey(x)[0, 0, 0] for x in table.min(1)]
    )
    # the same stream gives the same prompts; another stream draws them in another order
    again = ab.sample_pairs(settings, mix, None, [3], 500, lambda m: None)
    other = ab.sample_pairs(settings, mix, None, [4], 500, lambda m: None)
    assert again.prompts == data.prompts and other.prompts != data.prompts


# ------------------------------------------------------------------------------- equal drift
def test_interpolate_at_drift_hand_computed() -> None:
    drift, gain = [0.0, 0.1, 0.3], [0.0, 0.02, 0.05]
    assert ab.interpolate_at_drift(drift, gain, 0.05) == pytest.approx(0.01)
    assert ab.interpolate_at_drift(drift, gain, 0.2) == pytest.approx(0.035)  # halfway 0.1-0.3
    assert ab.interpolate_at_drift(drift, gain, 0.3) == pytest.approx(0.05)
    assert math.isnan(ab.interpolate_at_drift(drift, gain, 0.4))  # never reached: no extrapolation
    # not monotone: the first passage counts (0.15 is reached on the way to 0.2, at 3/4 of it)
    assert ab.interpolate_at_drift([0, 0.2, 0.1, 0.3], [0, 1, 2, 3], 0.15) == pytest.approx(0.75)
    # a flat segment at the level takes its first point
    assert ab.interpolate_at_drift([0, 0.1, 0.1], [0, 1, 2], 0.1) == pytest.approx(1.0)
    # many curves at once
    out = ab.interpolate_at_drift(
        np.array([[0, 0.1, 0.3], [0, 0.2, 0.4]]), np.array([[0, 1, 2], [0, 2, 4]]), 0.2
    )
    np.testing.assert_allclose(out, [1.5, 2.0])


def test_drift_levels_are_the_slower_schemes_points() -> None:
    # a moves less (largest drift 0.04 < 0.09): its curve-point drifts are the levels
    assert ab.drift_levels([0.01, 0.02, 0.04], [0.03, 0.06, 0.09]) == [0.01, 0.02, 0.04]
    assert ab.drift_levels([0.03, 0.06, 0.09], [0.01, 0.02, 0.04]) == [0.01, 0.02, 0.04]
    # non-monotone faster curve: only levels it reaches
    assert ab.drift_levels([0.05, 0.1], [0.2, 0.08]) == [0.05, 0.1]
    assert ab.drift_levels([0.0, 0.0], [0.1, 0.2]) == []  # a scheme that did not move


def test_equal_drift_comparison_hand_computed() -> None:
    # a reaches drifts 0.01 / 0.02 / 0.04 with gains 0.1 / 0.2 / 0.3; b reaches 0.03 / 0.06 /
    # 0.09 with gains 0.3 / 0.4 / 0.6. Levels: a's drifts. b at 0.01 = 0.3 / 3 = 0.1, at 0.02 =
    # 0.2, at 0.04 = 0.3 + (0.01 / 0.03) * 0.1 = 0.3333. Differences 0, 0, -0.0333. Every unit
    # and seed is the same, so the interval is the point.
    units = 3
    da = np.array([[0.0, 0.01, 0.02, 0.04]])
    db = np.array([[0.0, 0.03, 0.06, 0.09]])
    va = np.repeat(np.array([0.0, 0.1, 0.2, 0.3])[None, :, None], units, axis=2)
    vb = np.repeat(np.array([0.0, 0.3, 0.4, 0.6])[None, :, None], units, axis=2)
    out = ab.equal_drift_comparison(da, va, db, vb, n_boot=500)
    assert [o["drift"] for o in out] == pytest.approx([0.01, 0.02, 0.04])
    assert [o["a"] for o in out] == pytest.approx([0.1, 0.2, 0.3])
    assert [o["b"] for o in out] == pytest.approx([0.1, 0.2, 0.3 + 0.1 / 3])
    last = out[-1]["difference"]
    assert (last["mean"], last["lo"], last["hi"]) == pytest.approx((-0.1 / 3,) * 3)
    # at equal STEPS a would look worse by 0.2 / 0.2 / 0.3: the difference equal drift removes
    # two seeds: the mean curves are interpolated (seed 2 moves twice as far for the same gain)
    da2 = np.array([[0.0, 0.01, 0.02, 0.04], [0.0, 0.03, 0.06, 0.12]])
    va2 = np.concatenate([va, va])
    out2 = ab.equal_drift_comparison(da2, va2, da2, va2, levels=[0.05], n_boot=500)
    # mean drift curve 0, 0.02, 0.04, 0.08: 0.05 is a quarter of the way from 0.04 to 0.08
    assert out2[0]["a"] == pytest.approx(0.2 + 0.25 * 0.1)
    assert out2[0]["difference"]["mean"] == pytest.approx(0.0)


def _fake_run(judge_delta, bright_delta, drifts, base, steps=(5, 10)):
    curve = {}
    for step, dj, dbr, d in zip(steps, judge_delta, bright_delta, drifts, strict=True):
        curve[str(step)] = {
            "tastes": {
                "fidelity": (base["fidelity"] + dj).tolist(),
                "brightness": (base["brightness"] + dbr).tolist(),
            },
            "drift": d,
        }
    return {"curve": curve, "implicit_acc_end": 0.6, "train_seconds": 1.0, "round_data": []}


def test_summary_pareto_points_and_equal_drift_on_synthetic_runs() -> None:
    # DDE moves half as far as Diffusion-DPO (drift 0.1 / 0.2 against 0.2 / 0.4) for the same
    # brightness gain (+0.014 = 1 utility unit, then 2) and half the judge loss.
    base = {"fidelity": np.array([0.5, 0.6, 0.7, 0.8]), "brightness": np.array([0.4] * 4)}
    taste = "fidelity:1,brightness:1"
    s = ab.BenchSettings(
        steps=10,
        curve_points=2,
        curve_units=4,
        seeds=1,
        bootstrap=300,
        tastes=(taste,),
        schemes=("dde", "uniform"),
    )
    arms = {
        ("dde", "importance"): [_fake_run([-0.01, -0.02], [0.014, 0.028], [0.1, 0.2], base)],
        ("uniform", "importance"): [_fake_run([-0.02, -0.04], [0.014, 0.028], [0.2, 0.4], base)],
    }
    sec = ab.summarise_taste(s, taste, base, arms)
    pareto = sec["pareto"]["dde/importance"]
    assert [p["step"] for p in pareto] == [0, 5, 10]
    assert [p["fidelity_loss"] for p in pareto] == pytest.approx([0.0, 0.01, 0.02])
    assert [p["taste_gain"] for p in pareto] == pytest.approx([0.0, 1.0, 2.0])
    assert [p["drift"] for p in pareto] == pytest.approx([0.0, 0.1, 0.2])
    assert [p["utility_gain"] for p in pareto] == pytest.approx(
        [0, 1 - 0.01 / 0.11, 2 - 0.02 / 0.11]
    )
    assert ab.pareto_points(sec["curves"]["uniform/importance"])[2][
        "fidelity_loss"
    ] == pytest.approx(0.04)
    # the table row
    dde = sec["rows"][0]
    assert dde["label"] == "DDE (dde)"
    assert dde["judge_change"]["mean"] == pytest.approx(-0.02)
    assert dde["taste_change"]["brightness"]["mean"] == pytest.approx(0.028)
    assert dde["utility_gain"]["mean"] == pytest.approx(2 - 0.02 / 0.11)
    assert dde["win_rate"]["mean"] == 1.0 and dde["drift_end"] == pytest.approx(0.2)
    # at equal steps DDE leads on utility by (0.04 - 0.02) / 0.11
    (comp,) = sec["comparisons"]
    assert comp["utility_difference"]["mean"] == pytest.approx(0.02 / 0.11)
    # at equal drift (levels: DDE's drifts 0.1 and 0.2): DPO is at half its step-5 point at
    # 0.1, at its step-5 point at 0.2; the judge costs the same, DDE gains 0.5 / 1 utility more
    (eq,) = sec["equal_drift"]
    assert [lv["drift"] for lv in eq["levels"]] == pytest.approx([0.1, 0.2])
    assert [lv["judge"]["difference"]["mean"] for lv in eq["levels"]] == pytest.approx(
        [0, 0], abs=1e-12
    )
    assert [lv["utility"]["difference"]["mean"] for lv in eq["levels"]] == pytest.approx([0.5, 1.0])
    text = ab.format_equal_drift(sec)
    assert "DDE (dde) [a] vs Diffusion-DPO (uniform) [b]" in text and "+0.500" in text
    art = ab.ascii_pareto(sec)
    assert "D=DDE (dde)" in art and "U=Diffusion-DPO (uniform)" in art and "*" in art
    assert "brightness change" in ab.format_taste_table(sec)
    assert ab.utility_formula(sec) == "fidelity/0.11 + brightness/0.014"


def test_ascii_scatter_and_markers() -> None:
    marks = ab.arm_markers(["dde/importance", "uniform/importance", "dde/weighted"])
    assert marks["dde/importance"] == "D" and marks["uniform/importance"] == "U"
    assert marks["dde/weighted"] not in ("D", "U")
    text = ab.ascii_scatter({"D": [(0, 0), (0.01, 1.0)], "U": [(0, 0), (0.02, 0.5)]})
    assert "D" in text and "U" in text and "*" in text  # the origin is shared


# ------------------------------------------------------------------------------- smoke run
TINY = dict(
    seeds=1,
    steps=2,
    batch_size=2,
    pairs=4,
    eval_prompts=3,
    eval_seeds=1,
    validation_prompts=8,
    curve_points=2,
    drift_pairs=2,
    num_inference_steps=3,
    bootstrap=200,
    sample_batch=16,
    quick=True,
)


def _checkpoint(tmp_path: Path) -> Path:
    from worker.shapes.model import DEFAULT_CHECKPOINT, build_builtin, save_builtin

    if (DEFAULT_CHECKPOINT / "model_index.json").is_file():
        return DEFAULT_CHECKPOINT
    # no shipped checkpoint yet: an untrained model exercises the same code
    return save_builtin(build_builtin(), tmp_path / "ckpt")


@pytest.mark.slow
def test_tiny_benchmark_run(tmp_path: Path) -> None:
    tastes = ("fidelity:1", "fidelity:1,brightness:1")
    settings = ab.BenchSettings(
        checkpoint=str(_checkpoint(tmp_path)),
        schemes=("dde", "uniform"),
        tastes=tastes,
        timestep_modes=("importance", "weighted"),
        **TINY,
    )
    out = tmp_path / "out"
    result = ab.run_benchmark(settings, out, log=lambda s: None)
    text = ab.report(result)

    assert [sec["taste"] for sec in result["tastes"]] == list(tastes)
    for sec in result["tastes"]:
        # dde in both modes, Diffusion-DPO once
        assert [(r["scheme"], r["mode"]) for r in sec["rows"]] == [
            ("dde", "importance"),
            ("dde", "weighted"),
            ("uniform", "importance"),
        ]
        for r in sec["rows"]:
            assert 0.0 <= r["win_rate"]["lo"] <= r["win_rate"]["mean"] <= r["win_rate"]["hi"] <= 1
            e = r["utility_gain"]
            assert e["lo"] <= e["mean"] <= e["hi"]
            assert r["drift_end"] > 0 and r["seconds_per_run"] > 0
        # every curve starts at the base (step 0, drift 0) and has its drift at each point
        for pts in sec["curves"].values():
            assert [p["step"] for p in pts] == [0, 1, 2] and pts[0]["drift"] == 0.0
            assert all(p["drift"] > 0 for p in pts[1:])
        assert {c["a"] for c in sec["comparisons"]} == {"dde/importance", "dde/weighted"}
        assert [e["a"] for e in sec["equal_drift"]] == ["dde/importance", "dde/weighted"]
        slug = ab.taste_slug(sec["taste"])
        for name in (f"curve_{slug}.png", f"pareto_{slug}.png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bright = result["tastes"][1]
    assert bright["other_tastes"] == ["brightness"] and "brightness change" in text
    for label in ("DDE (dde, importance)", "DDE (dde, weighted)", "Diffusion-DPO (uniform)"):
        assert label in text
    assert "QUICK" in text and "at equal drift" in text and "Pareto" in text
    assert "== taste fidelity:1,brightness:1" in text
    saved = json.loads((out / "alignment.json").read_text())
    assert set(saved["base_scores"]) >= {"fidelity", "brightness"}
    assert len(saved["base_scores"]["fidelity"]) == 3
    assert set(saved["runs"]) == set(tastes)
    # a rerun reads the pairs, the base evaluation and the runs from the cache
    again = ab.run_benchmark(settings, out, log=lambda s: None)
    assert again["tastes"] == result["tastes"]


@pytest.mark.slow
def test_tiny_online_run_resamples_pairs_from_the_current_model(tmp_path: Path) -> None:
    tiny = {**TINY, "steps": 4, "curve_points": 4}
    settings = ab.BenchSettings(
        checkpoint=str(_checkpoint(tmp_path)),
        schemes=("uniform",),
        rounds=2,
        candidates=3,
        **tiny,
    )
    result = ab.run_benchmark(settings, tmp_path / "out", log=lambda s: None)
    (run_file,) = (tmp_path / "out" / "runs").glob("fidelity1-uniform-importance-seed0-*.json")
    run = json.loads(run_file.read_text())
    # round 2 sampled its own pairs (from the model after round 1), best vs worst of 3
    assert [d["round"] for d in run["round_data"]] == [2]
    assert run["round_data"][0]["pairs"] <= settings.pairs
    assert run["round_data"][0]["candidates"] >= run["round_data"][0]["pairs"]
    # the curve runs over the global step count, across the round boundary, and its drift is
    # measured from the original base (not from round 2's parent): it does not fall back to 0
    assert sorted(int(k) for k in run["curve"]) == [1, 2, 3, 4]
    assert all(run["curve"][str(k)]["drift"] > 0 for k in (1, 2, 3, 4))
    assert len(run["history"]["loss"]) == 4
    text = ab.report(result)
    assert "in 2 online rounds" in text and "best vs worst of 3" in text
    assert "online, 2 rounds" in text and "rise" in text


def test_concurrent_snapshots_of_one_checkpoint_share_one_copy(tmp_path: Path) -> None:
    # Two benchmarks started together on one --out once raced on a fixed temporary folder name
    # (FileExistsError). Every caller must get the same, complete copy.
    import threading
    from concurrent.futures import ThreadPoolExecutor

    src = tmp_path / "ckpt"
    (src / "unet").mkdir(parents=True)
    (src / "model_index.json").write_text('{"kind": "pixel"}')
    (src / "unet" / "weights.bin").write_bytes(bytes(range(256)) * 400)
    for i in range(300):  # many files: a copy takes long enough for the callers to overlap
        (src / "unet" / f"part-{i}.bin").write_bytes(bytes([i % 256]) * 4096)
    out = tmp_path / "out"
    start = threading.Barrier(6)

    def snapshot(_: int) -> tuple[Path, str]:
        start.wait()
        return ab.snapshot_checkpoint(src, out)

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(snapshot, range(6)))
    assert len({r for r in results}) == 1
    dest, fingerprint = results[0]
    assert fingerprint == ab.checkpoint_fingerprint(src) == ab.checkpoint_fingerprint(dest)
    assert sorted(p.name for p in out.iterdir()) == [dest.name]  # no temporary folder left
    # a stale copy under the same name is replaced
    (dest / "unet" / "weights.bin").write_bytes(b"corrupt")
    again, _ = ab.snapshot_checkpoint(src, out)
    assert again == dest and ab.checkpoint_fingerprint(dest) == fingerprint


def test_only_locks_of_dead_processes_are_stale(tmp_path: Path) -> None:
    # A benchmark clears the run locks an interrupted one left; it must not clear those of a
    # benchmark running beside it on the same --out (it once did, and both trained one run).
    import os
    import subprocess
    import sys

    live = tmp_path / "live.lock"
    live.write_text(str(os.getpid()))
    assert not ab.lock_is_stale(live)
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    dead = tmp_path / "dead.lock"
    dead.write_text(gone.stdout.strip())
    assert ab.lock_is_stale(dead)
    empty = tmp_path / "empty.lock"
    empty.write_text("")
    assert not ab.lock_is_stale(empty)  # its writer may be about to write its pid
    old = os.stat(empty).st_mtime - 120
    os.utime(empty, (old, old))
    assert ab.lock_is_stale(empty)
    assert not ab.lock_is_stale(tmp_path / "missing.lock")


def test_winner_anchor_flag_reaches_every_scheme_and_is_validated() -> None:
    s, _, _, _ = ab.parse_args(["--winner-anchor", "2.5", "--schemes", "dde,uniform"])
    assert s.winner_anchor == 2.5
    assert [ab.train_config(s, scheme, 0).winner_anchor for scheme in s.schemes] == [2.5, 2.5]
    assert ab.train_config(ab.BenchSettings(), "dde", 0).winner_anchor == 0.0
    # the anchor is part of every run's cache key: anchored runs never reuse plain ones
    job = ab.Job(ab.DEFAULT_TASTE, "dde", "importance", 0)
    assert ab.run_key(s, job, {}, {}) != ab.run_key(s.replace(winner_anchor=0.0), job, {}, {})
    with pytest.raises(ValueError, match="winner_anchor"):
        ab.BenchSettings(winner_anchor=-1.0)
