"""The label rules of ``backend.aggregation`` against hand-computed cases."""

from __future__ import annotations

import math

import pytest

from backend.aggregation import (
    PairVote,
    aggregate,
    dawid_skene_accuracies,
    label_dawid_skene,
)


def votes(spec: dict[int, list[tuple[int, str]]]) -> list[PairVote]:
    return [PairVote(p, u, label) for p, vs in spec.items() for u, label in vs]


def test_each_keeps_every_vote_and_counts_contradictions():
    got = aggregate(votes({1: [(1, "a"), (2, "b")], 2: [(1, "a")]}), "each")
    assert [(x.pair_id, x.label) for x in got.labels] == [(1, "a"), (1, "b"), (2, "a")]
    assert got.summary() == {
        "rule": "each",
        "pairs_in": 2,
        "votes_in": 3,
        "pairs_kept": 2,
        "votes_kept": 3,
        "contested_pairs": 0,
        "contradicted_pairs": 1,
    }


def test_majority_plurality_and_contested_pairs():
    got = aggregate(
        votes(
            {
                1: [(1, "a"), (2, "a"), (3, "b")],  # a, 2/3
                2: [(1, "a"), (2, "b")],  # 1-1: contested, dropped
                3: [(1, "a"), (2, "tie")],  # a vs tie 1-1: contested, dropped
                4: [(1, "tie"), (2, "tie"), (3, "a")],  # tie, 2/3
                5: [(1, "b")],  # b, 1/1
            }
        ),
        "majority",
    )
    assert [(x.pair_id, x.label, x.votes) for x in got.labels] == [
        (1, "a", 3),
        (4, "tie", 3),
        (5, "b", 1),
    ]
    assert got.labels[0].confidence == pytest.approx(2 / 3)
    assert got.summary() == {
        "rule": "majority",
        "pairs_in": 5,
        "votes_in": 11,
        "pairs_kept": 3,
        "votes_kept": 7,
        "contested_pairs": 2,
        "contradicted_pairs": 2,
    }


def test_dawid_skene_one_em_step_by_hand():
    # Start q1 = 2/3, q2 = 1/3 (share of "a" votes). u1, u2 agree with the soft majority
    # 2/3 + 2/3 = 4/3 times in 2 votes: p = (4/3 + 1) / 4 = 7/12; u3: (1/3 + 1/3 + 1) / 4 = 5/12.
    # E-step: L1 = 2 log(7/5) - log(5/7) = 3 log 1.4, q1 = 1.4^3 / (1 + 1.4^3); q2 = 1 - q1.
    v = votes({1: [(1, "a"), (2, "a"), (3, "b")], 2: [(1, "b"), (2, "b"), (3, "a")]})
    acc, q = dawid_skene_accuracies(v, iterations=1)
    assert acc == pytest.approx({1: 7 / 12, 2: 7 / 12, 3: 5 / 12})
    assert q[1] == pytest.approx(2.744 / 3.744)
    assert q[2] == pytest.approx(1 / 3.744)


def test_dawid_skene_turns_an_adversary_and_drops_a_perfect_contradiction():
    spec: dict[int, list[tuple[int, str]]] = {}
    for p in range(10):  # u1, u2 honest (truth "a"), u3 always the opposite
        spec[p] = [(1, "a"), (2, "a"), (3, "b")]
    spec[10] = [(3, "b")]  # only the adversary: its "b" means "a"
    spec[11] = [(1, "a"), (2, "b")]  # two equally reliable voters disagree: contested
    spec[12] = [(1, "tie"), (2, "tie")]  # only ties: a tie label
    got = label_dawid_skene(votes(spec))
    labels = {x.pair_id: x.label for x in got.labels}
    assert labels[10] == "a"
    assert 11 not in labels
    assert labels[12] == "tie"
    assert all(labels[p] == "a" for p in range(10))
    assert got.reliability[1] > 0.85 and got.reliability[3] < 0.15
    assert math.isclose(got.reliability[1], got.reliability[2])
    s = got.summary()
    assert (s["pairs_in"], s["pairs_kept"], s["contested_pairs"]) == (13, 12, 1)
    assert (s["votes_in"], s["votes_kept"]) == (35, 30 + 1 + 2)
    assert s["contradicted_pairs"] == 11  # pairs 0-9 and 11


def test_majority_and_each_disagree_where_each_trains_contradictions():
    v = votes({1: [(1, "a"), (2, "a"), (3, "b")]})
    assert len(aggregate(v, "each").labels) == 3
    assert len(aggregate(v, "majority").labels) == 1


def test_bad_rule_and_bad_label_are_errors():
    with pytest.raises(ValueError, match="unknown label rule"):
        aggregate([], "mean")
    with pytest.raises(ValueError, match="vote label"):
        aggregate([PairVote(1, 1, "left")], "majority")
    assert aggregate([], "dawid_skene").labels == []


def test_label_snapshot_turns_votes_into_the_workers_rows():
    from backend.services.rounds import label_snapshot

    # pair 1: images 10 (a) / 11 (b); three votes: a, a, b. pair 2: 20 / 21; one b vote by a
    # flagged user 9 (excluded). Rows: (pair, user, choice, winner, prompt, a, a_path, b, b_path).
    rest1 = ("p1", 10, "x/10.png", 11, "x/11.png")
    rest2 = ("p2", 20, "x/20.png", 21, "x/21.png")
    rows = [
        (1, 1, "left", 10, *rest1),
        (1, 2, "right", 10, *rest1),
        (1, 3, "left", 11, *rest1),
        (2, 9, "left", 21, *rest2),
    ]
    labels, summary = label_snapshot(rows, "majority", exclude_users={9})
    assert labels == [("left", 10, *rest1)]
    assert summary["pairs_kept"] == 1 and summary["votes_kept"] == 3
    assert (summary["excluded_votes"], summary["excluded_annotators"]) == (1, 1)
    each, s_each = label_snapshot(rows, "each")
    assert [r[:2] for r in each] == [("left", 10), ("right", 10), ("left", 11), ("left", 21)]
    assert s_each["contradicted_pairs"] == 1
