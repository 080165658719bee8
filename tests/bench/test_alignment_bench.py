"""Tests of bench/alignment.py: its statistics helpers (hand-computed values) and a tiny run."""

from __future__ import annotations

import json
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


def test_settings_validate() -> None:
    with pytest.raises(ValueError):
        ab.BenchSettings(label_noise=0.6)
    with pytest.raises(ValueError):
        ab.BenchSettings(steps=0)
    s, out, threads, workers = ab.parse_args(
        ["--quick", "--schemes", "dde,uniform", "--out", "/tmp/x"]
    )
    assert s.quick and s.schemes == ("dde", "uniform") and out == Path("/tmp/x")
    assert (threads, workers) == (1, 1)


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
    # both are in the cache keys: a best-of-3 or online run never reuses a plain one
    assert ab.data_key(s, "f") != ab.data_key(s.replace(candidates=2), "f")
    assert ab.run_key(s, "dde", 0, {}, {}) != ab.run_key(s.replace(rounds=1), "dde", 0, {}, {})


def test_sample_pairs_takes_the_best_and_worst_of_the_candidates(monkeypatch) -> None:
    # Candidate c of the j-th prompt drawn has a known score; the images carry it in their
    # pixels so that the (patched) annotator votes by it. With no label noise each pair must be
    # (the best candidate, the worst one) of its prompt, with their scores.
    from worker.shapes import judge

    k, n = 4, 6
    table = np.random.default_rng(0).permutation(k * n).reshape(n, k) / (k * n)  # distinct
    calls: list[list[int]] = []

    def fake_sample_and_judge(backbone, prompts, seeds, settings):
        calls.append(list(seeds))
        idx = [(s - 500) // k for s in seeds], [(s - 500) % k for s in seeds]
        scores = np.array([table[j % n, c] for j, c in zip(*idx, strict=True)])
        images = np.repeat((scores * 250).astype(np.uint8)[:, None, None, None], 3, axis=3)
        return images, scores

    def fake_prefer(a, b, prompt, *, noise, rng):
        return "tie" if a.mean() == b.mean() else ("a" if a.mean() > b.mean() else "b")

    monkeypatch.setattr(ab, "sample_and_judge", fake_sample_and_judge)
    monkeypatch.setattr(judge, "prefer", fake_prefer)
    settings = ab.BenchSettings(pairs=n, candidates=k, label_noise=0.0)
    data = ab.sample_pairs(settings, None, [3], 500, lambda m: None)

    assert len(data.prompts) == n and data.stats["ties_dropped"] == 0
    assert not data.flipped.any()
    # every candidate of the j-th prompt was sampled with seed 500 + k j + c
    assert sorted(calls[0]) == [
        500 + k * j + c for j in range(len(calls[0]) // k) for c in range(k)
    ]
    np.testing.assert_allclose(data.winner_scores, table.max(axis=1))
    np.testing.assert_allclose(data.loser_scores, table.min(axis=1))
    np.testing.assert_array_equal(
        data.winners[:, 0, 0, 0], (table.max(axis=1) * 250).astype(np.uint8)
    )
    np.testing.assert_array_equal(
        data.losers[:, 0, 0, 0], (table.min(axis=1) * 250).astype(np.uint8)
    )
    # the same stream gives the same prompts; another stream draws them in another order
    again = ab.sample_pairs(settings, None, [3], 500, lambda m: None)
    other = ab.sample_pairs(settings, None, [4], 500, lambda m: None)
    assert again.prompts == data.prompts and other.prompts != data.prompts


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
    num_inference_steps=3,
    bootstrap=200,
    sample_batch=16,
    quick=True,
)


@pytest.mark.slow
def test_tiny_benchmark_run(tmp_path: Path) -> None:
    from worker.shapes.model import DEFAULT_CHECKPOINT, build_builtin, save_builtin

    checkpoint = DEFAULT_CHECKPOINT
    if not (checkpoint / "model_index.json").is_file():
        # no shipped checkpoint yet: an untrained model exercises the same code
        checkpoint = save_builtin(build_builtin(), tmp_path / "ckpt")
    settings = ab.BenchSettings(checkpoint=str(checkpoint), **TINY)
    out = tmp_path / "out"
    result = ab.run_benchmark(settings, out, log=lambda s: None)
    text = ab.report(result)

    schemes = [r["scheme"] for r in result["table"]]
    assert schemes == ["base", "dde", "uniform", "dde-stepwise", "dde-single-shot"]
    for r in result["table"][1:]:
        assert 0.0 <= r["score"]["lo"] <= r["score"]["mean"] <= r["score"]["hi"] <= 1.0
        assert 0.0 <= r["win_rate"]["mean"] <= 1.0
        assert r["seconds_per_run"] > 0
    for label in (
        "base model",
        "DDE (dde)",
        "Diffusion-DPO (uniform)",
        "DDE stepwise-only",
        "DDE single-shot-only",
    ):
        assert label in text
    assert "QUICK" in text and "DDE vs Diffusion-DPO" in text
    png = out / "alignment_curve.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "alignment.json").read_text())
    assert [p["step"] for p in saved["curves"]["dde"]] == [0, 1, 2]
    assert len(saved["base_scores"]) == 3
    # a rerun reads the pairs, the base evaluation and the runs from the cache
    again = ab.run_benchmark(settings, out, log=lambda s: None)
    assert again["table"] == result["table"]


@pytest.mark.slow
def test_tiny_online_run_resamples_pairs_from_the_current_model(tmp_path: Path) -> None:
    from worker.shapes.model import DEFAULT_CHECKPOINT, build_builtin, save_builtin

    checkpoint = DEFAULT_CHECKPOINT
    if not (checkpoint / "model_index.json").is_file():
        checkpoint = save_builtin(build_builtin(), tmp_path / "ckpt")
    tiny = {**TINY, "steps": 4, "curve_points": 4}
    settings = ab.BenchSettings(
        checkpoint=str(checkpoint), schemes=("uniform",), rounds=2, candidates=3, **tiny
    )
    result = ab.run_benchmark(settings, tmp_path / "out", log=lambda s: None)
    (run_file,) = (tmp_path / "out" / "runs").glob("uniform-seed0-*.json")
    run = json.loads(run_file.read_text())
    # round 2 sampled its own pairs (from the model after round 1), best vs worst of 3
    assert [d["round"] for d in run["round_data"]] == [2]
    assert run["round_data"][0]["pairs"] <= settings.pairs
    assert run["round_data"][0]["candidates"] >= run["round_data"][0]["pairs"]
    # the curve runs over the global step count, across the round boundary
    assert sorted(int(k) for k in run["curve"]) == [1, 2, 3, 4]
    assert len(run["history"]["loss"]) == 4
    assert "in 2 online rounds" in ab.report(result) and "best vs worst of 3" in ab.report(result)


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
    assert ab.run_key(s, "dde", 0, {}, {}) != ab.run_key(
        s.replace(winner_anchor=0.0), "dde", 0, {}, {}
    )
    with pytest.raises(ValueError, match="winner_anchor"):
        ab.BenchSettings(winner_anchor=-1.0)
