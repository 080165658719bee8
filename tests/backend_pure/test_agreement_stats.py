"""Inter-annotator agreement and bad-voter detection against hand-computed values."""

import math
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backend.agreement import (
    AnnotatorReliability,
    VoteRecord,
    annotator_reliability,
    binomial_cdf,
    cohen_kappa,
    gold_accuracy,
    krippendorff_alpha_nominal,
    leave_one_out_majority,
)

N = None


def test_cohen_kappa_textbook_2x2():
    # Wikipedia "Cohen's kappa" example: 50 proposals, A and B both yes on 20, A yes/B no on 5,
    # A no/B yes on 10, both no on 15. p_o = 35/50 = 0.7; A says yes 25/50, B says yes 30/50,
    # p_e = 0.5*0.6 + 0.5*0.4 = 0.5; kappa = (0.7 - 0.5) / (1 - 0.5) = 0.4.
    a = ["yes"] * 25 + ["no"] * 25
    b = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    assert cohen_kappa(b, a) == pytest.approx(0.4)


def test_cohen_kappa_extremes():
    assert cohen_kappa(["a", "b", "tie"], ["a", "b", "tie"]) == 1.0
    # Perfect disagreement on a balanced binary task: p_o = 0, p_e = 0.5 -> -1.
    assert cohen_kappa(["a", "b", "a", "b"], ["b", "a", "b", "a"]) == pytest.approx(-1.0)
    # One shared label everywhere: 0/0, reported as 1.0.
    assert cohen_kappa(["a"] * 4, ["a"] * 4) == 1.0
    # Three-category hand example. Agreements at items 0, 1, 3, 4 -> p_o = 4/6.
    # Frequencies: A = {a: 3, b: 2, tie: 1}, B = {a: 3, b: 3, tie: 0};
    # p_e = (3*3 + 2*3 + 1*0) / 36 = 15/36; kappa = (24/36 - 15/36) / (21/36) = 9/21 = 3/7.
    a = ["a", "a", "a", "b", "b", "tie"]
    b = ["a", "a", "b", "b", "b", "a"]
    assert cohen_kappa(a, b) == pytest.approx(3 / 7)


def test_cohen_kappa_input_errors():
    with pytest.raises(ValueError, match="length"):
        cohen_kappa(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="at least one"):
        cohen_kappa([], [])


def test_krippendorff_wikipedia_example():
    # Wikipedia "Krippendorff's alpha" worked example: 3 coders, 15 units, values 1-4.
    A = [N, N, N, N, N, 3, 4, 1, 2, 1, 1, 3, 3, N, 3]
    B = [1, N, 2, 1, 3, 3, 4, 3, N, N, N, N, N, N, N]
    C = [N, N, 2, 1, 3, 4, 4, N, 2, 1, 1, 3, 3, N, 4]
    units = [list(u) for u in zip(A, B, C, strict=True)]
    # By hand: 12 pairable units; coincidences o11=6, o22=4, o33=7, o44=3, o34=o43=2,
    # o13=o31=1, so n_1=7, n_2=4, n_3=10, n_4=5, n=26 and the off-diagonal sum is 6.
    # sum_{c!=k} n_c n_k = 26^2 - (49 + 16 + 100 + 25) = 486.
    # alpha = 1 - (26 - 1) * 6 / 486 = 56/81 = 0.6914 (Wikipedia: 0.691).
    assert krippendorff_alpha_nominal(units) == pytest.approx(56 / 81)
    assert round(krippendorff_alpha_nominal(units), 3) == 0.691


def test_krippendorff_2011_reliability_data():
    # Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", 4 coders x 12 units,
    # nominal alpha = 0.743.
    A = [1, 2, 3, 3, 2, 1, 4, 1, 2, N, N, N]
    B = [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, N, 3]
    C = [N, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, N]
    D = [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, N]
    units = [list(u) for u in zip(A, B, C, D, strict=True)]
    assert round(krippendorff_alpha_nominal(units), 3) == 0.743


def test_krippendorff_small_hand_example_and_edges():
    # Two coders, two units: ("a","a") and ("a","b"). Coincidences: o_aa = 2, o_ab = o_ba = 1;
    # n_a = 3, n_b = 1, n = 4; alpha = 1 - 3 * 2 / (16 - 10) = 0.
    assert krippendorff_alpha_nominal([["a", "a"], ["a", "b"]]) == pytest.approx(0.0)
    # Unpairable units (one value) are ignored.
    assert krippendorff_alpha_nominal([["a", "a"], ["a", "b"], ["b", N], [N, N]]) == pytest.approx(
        0.0
    )
    # Perfect agreement with variation -> 1; a single category everywhere -> 1 by convention.
    assert krippendorff_alpha_nominal([["a", "a"], ["b", "b", N]]) == 1.0
    assert krippendorff_alpha_nominal([["a", "a"], ["a", "a", "a"]]) == 1.0
    with pytest.raises(ValueError, match="undefined"):
        krippendorff_alpha_nominal([["a", N], [N, "b"]])


def test_gold_accuracy():
    assert gold_accuracy([("a", "a"), ("b", "a"), ("tie", None), ("b", "b")]) == pytest.approx(
        2 / 3
    )
    assert gold_accuracy([("a", None)]) is None
    assert gold_accuracy([]) is None


def _exact_cdf(k: int, n: int, p: Fraction) -> Fraction:
    return sum((math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1)), Fraction(0))


def test_binomial_cdf_matches_exact_rational_arithmetic():
    assert binomial_cdf(3, 10, 0.5) == pytest.approx(176 / 1024, rel=1e-12)
    assert binomial_cdf(0, 10, 0.9) == pytest.approx(1e-10, rel=1e-9)
    for k, n, p in [
        (400, 1000, Fraction(1, 2)),
        (5, 200, Fraction(1, 10)),
        (70, 100, Fraction(4, 5)),
    ]:
        exact = float(_exact_cdf(k, n, p))
        assert binomial_cdf(k, n, float(p)) == pytest.approx(exact, rel=1e-9)
    # Far tail: 1e-200-ish values are still represented, not rounded to 0 by overflow tricks.
    assert 0 < binomial_cdf(0, 500, 0.6) == pytest.approx(0.4**500, rel=1e-9)
    assert binomial_cdf(-1, 5, 0.3) == 0.0
    assert binomial_cdf(5, 5, 0.3) == 1.0
    assert binomial_cdf(2, 5, 0.0) == 1.0
    assert binomial_cdf(2, 5, 1.0) == 0.0


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 60), st.data(), st.fractions(min_value=0, max_value=1, max_denominator=50))
def test_binomial_cdf_property(n, data, p):
    k = data.draw(st.integers(-1, n + 1))
    assert binomial_cdf(k, n, float(p)) == pytest.approx(
        float(_exact_cdf(min(k, n), n, p)) if k >= 0 else 0.0, rel=1e-9, abs=1e-300
    )


def test_leave_one_out_majority():
    votes = [
        (1, 10, "a"),
        (2, 10, "a"),
        (3, 10, "b"),
        (1, 11, "tie"),
        (2, 12, "a"),
        (3, 12, "a"),
        (4, 12, "b"),
    ]
    m = leave_one_out_majority(votes)
    assert m[(1, 10)] is None  # others: a, b -> split
    assert m[(2, 10)] is None
    assert m[(3, 10)] == "a"  # others: a, a
    assert m[(1, 11)] is None  # nobody else
    assert m[(2, 12)] is None  # others: a, b
    assert m[(4, 12)] == "a"
    with pytest.raises(ValueError, match="twice"):
        leave_one_out_majority([(1, 10, "a"), (1, 10, "b")])


def test_annotator_reliability_hand_computed():
    records = []
    # user 1: 10 ordinary votes, all agree with the majority.
    records += [(1, p, "a", "a") for p in range(10)]
    # user 2: 10 ordinary votes, 8 agree.
    records += [(2, p, "a", "a") for p in range(8)] + [(2, p, "b", "a") for p in (8, 9)]
    # user 3: 5 gold votes all wrong, 5 ordinary votes all disagree.
    records += [VoteRecord(3, 100 + p, "b", "a", is_gold=True) for p in range(5)]
    records += [(3, p, "b", "a") for p in range(5)]
    # user 4: one vote with no reference (nobody else voted): volume only.
    records += [(4, 50, "tie", None)]
    # user 2 also saw one gold pair and got it right.
    records += [(2, 101, "a", "a", True)]
    rel = {r.user_id: r for r in annotator_reliability(records)}
    assert list(rel) == [1, 2, 3, 4]

    u3 = rel[3]
    assert (u3.votes, u3.gold_seen, u3.gold_correct, u3.compared, u3.agreed) == (10, 5, 0, 5, 0)
    assert u3.gold_accuracy == 0.0 and u3.agreement_with_majority == 0.0
    # Others (users 1, 2): 10 + 9 matches of 21 comparisons, p0 = 19/21; P(X <= 0) = (2/21)^10.
    assert u3.p_value == pytest.approx((2 / 21) ** 10, rel=1e-9)
    assert u3.outlier is True

    u2 = rel[2]
    assert (u2.votes, u2.gold_seen, u2.gold_correct, u2.compared, u2.agreed) == (11, 1, 1, 10, 8)
    assert u2.gold_accuracy == 1.0 and u2.agreement_with_majority == pytest.approx(0.8)
    # k = 9 of n = 11; others (users 1, 3): 10 of 20 -> p0 = 0.5;
    # P(X <= 9) = 1 - (C(11,10) + C(11,11)) / 2^11 = 1 - 12/2048.
    assert u2.p_value == pytest.approx(1 - 12 / 2048, rel=1e-12)
    assert u2.outlier is False

    u1 = rel[1]
    assert u1.gold_seen == 0 and u1.gold_accuracy is None
    assert u1.agreement_with_majority == 1.0
    assert u1.p_value == 1.0 and u1.outlier is False  # k == n

    u4 = rel[4]
    assert u4 == AnnotatorReliability(
        user_id=4,
        votes=1,
        gold_seen=0,
        gold_correct=0,
        gold_accuracy=None,
        compared=0,
        agreed=0,
        agreement_with_majority=None,
        p_value=None,
        outlier=False,
    )


def test_annotator_reliability_alpha_threshold_and_errors():
    # A lone annotator has nobody to compare with: no test.
    only = annotator_reliability([(1, 1, "a", "a")])
    assert only[0].p_value is None and only[0].outlier is False
    # k = 0 of n = 3 against p0 = 0.5: p = 1/8, not below 0.01 but below alpha=0.2.
    recs = [(1, p, "a", "a") for p in range(4)] + [(1, p, "a", "b") for p in range(4, 8)]
    recs += [(2, p, "b", "a") for p in range(3)]
    assert annotator_reliability(recs)[1].p_value == pytest.approx(1 / 8)
    assert annotator_reliability(recs)[1].outlier is False
    assert annotator_reliability(recs, alpha=0.2)[1].outlier is True
    with pytest.raises(ValueError, match="no gold answer"):
        annotator_reliability([VoteRecord(1, 1, "a", None, is_gold=True)])
    assert annotator_reliability([]) == []


# ---------------------------------------------------------------- issue 12: surfaced agreement
from backend.agreement import annotator_alpha, flag_reasons, pairwise_kappa  # noqa: E402

# Three units: U1 = {u1: a, u2: a, u3: b}, U2 = {u1: a, u2: a}, U3 = {u1: b, u3: a}.
_UNITS = [(1, 1, "a"), (2, 1, "a"), (3, 1, "b"), (1, 2, "a"), (2, 2, "a"), (1, 3, "b"), (3, 3, "a")]


def test_annotator_alpha_by_hand():
    # n = 7 pairable values (a: 5, b: 2); D_e = (49 - 25 - 4) / (7 * 6) = 10/21.
    # Disagreement per value: U1 u1 1/2, u2 1/2, u3 1; U2 0, 0; U3 1, 1.
    # u1: (1/2 + 0 + 1) / 3 = 1/2 -> 1 - (1/2) * 21/10 = -0.05; u2: 1/4 -> 0.475; u3: 1 -> -1.1.
    # Overall: (4/7) * 21/10 -> 1 - 1.2 = -0.2, the vote-weighted mean of the three.
    overall, per = annotator_alpha(_UNITS)
    assert overall == pytest.approx(-0.2)
    assert per == pytest.approx({1: -0.05, 2: 0.475, 3: -1.1})
    units = [["a", "a", "b"], ["a", "a", None], ["b", None, "a"]]
    assert krippendorff_alpha_nominal(units) == pytest.approx(overall)
    assert annotator_alpha([(1, 1, "a")]) == (None, {})
    assert annotator_alpha([(1, 1, "a"), (2, 1, "a")]) == (1.0, {1: 1.0, 2: 1.0})


def test_pairwise_kappa_by_hand():
    # u1-u2 share U1, U2: (a, a), (a, a) -> both constant and equal: 1.0.
    # u1-u3 share U1, U3: (a, b), (b, a): p_o = 0, p_e = 1/2 -> -1. u2-u3 share only U1.
    assert pairwise_kappa(_UNITS, min_overlap=2) == [(1, 2, 2, 1.0), (1, 3, 2, -1.0)]
    assert pairwise_kappa(_UNITS, min_overlap=3) == []


def test_flag_reasons():
    rel = AnnotatorReliability(7, 10, 5, 2, 0.4, 0, 0, None, 0.001, True)
    assert flag_reasons(rel, fast_votes=3, timed_votes=6, gold_floor=0.6) == [
        "gold",
        "outlier",
        "fast",
    ]
    ok = AnnotatorReliability(8, 10, 4, 0, 0.0, 0, 0, None, 0.5, False)  # 4 gold: too few
    assert flag_reasons(ok, fast_votes=2, timed_votes=6, gold_floor=0.6) == []
    assert flag_reasons(None, fast_votes=4, timed_votes=4, gold_floor=0.6) == []
