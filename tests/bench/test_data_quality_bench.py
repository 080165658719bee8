"""Smoke test of ``python -m bench.data_quality`` on a small crowd (about a second)."""

from __future__ import annotations

import argparse

from bench import data_quality


def _args(**kw: object) -> argparse.Namespace:
    base = dict(
        annotators=30,
        pairs=600,
        overlap=3,
        random_rate=0.2,
        adversarial_rate=0.1,
        good_accuracy=0.85,
        adversarial_accuracy=0.15,
        gold_rate=0.1,
        random_pace="fast",
    )
    base.update(kw)
    return argparse.Namespace(**base)


def test_crowd_has_the_planted_rates_and_overlap():
    crowd = data_quality.simulate(_args(), seed=0)
    kinds = list(crowd.kinds.values())
    assert (kinds.count("random"), kinds.count("adversarial"), kinds.count("good")) == (6, 3, 21)
    assert len(crowd.votes) == 600 * 3
    per_pair = {}
    for u, p, _label, _ms in crowd.votes:
        per_pair.setdefault(p, set()).add(u)
    assert all(len(us) == 3 for us in per_pair.values())


def test_prints_the_table(capsys):
    assert data_quality.main(["--annotators", "30", "--pairs", "600", "--seeds", "2"]) == 0
    out = capsys.readouterr().out
    for rule in ("each", "majority", "dawid_skene"):
        assert out.count(f"\n{rule} ") == 2
    for kind in ("good", "random", "adversarial"):
        assert f"\n{kind} " in out
