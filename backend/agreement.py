"""Inter-annotator agreement and per-annotator reliability.

Pure functions (standard library only) that the API layer calls with votes it read from the
database. A *choice* is any hashable label; in Prefloop it is one of the vote choices
(``"a"``, ``"b"``, ``"tie"``, ``"both_bad"``) and two votes agree when their choices are equal.

* :func:`cohen_kappa`: two annotators who labelled the same items.
* :func:`krippendorff_alpha_nominal`: any number of annotators, missing labels allowed
  (the overlap setting: several annotators per pair, each pair seen by a few of them).
* :func:`annotator_reliability`: per-annotator volume, gold accuracy, agreement with the
  other annotators, and a statistical outlier test for bad voters (exact one-sided binomial
  test, as Chatbot Arena does for anomalous users).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

#: Default significance level of the bad-voter test.
OUTLIER_ALPHA = 0.01


def cohen_kappa(labels_a: Sequence[Hashable], labels_b: Sequence[Hashable]) -> float:
    """Cohen's kappa between two annotators.

    ``labels_a[i]`` and ``labels_b[i]`` are the labels the two annotators gave item ``i``;
    both sequences must be non-empty and of equal length, with no missing values (drop items
    either annotator skipped before calling). ``kappa = (p_o - p_e) / (1 - p_e)`` where
    ``p_o`` is the observed agreement and ``p_e`` the agreement expected from each annotator's
    own label frequencies. When both annotators used one and the same label for every item,
    ``p_e = 1`` and kappa is 0/0; this function returns 1.0 in that case (perfect agreement),
    so the result is always a finite number in ``[-1, 1]``.
    """
    if len(labels_a) != len(labels_b):
        raise ValueError(f"label sequences differ in length ({len(labels_a)} vs {len(labels_b)})")
    n = len(labels_a)
    if n == 0:
        raise ValueError("cohen_kappa needs at least one item")
    p_o = sum(1 for x, y in zip(labels_a, labels_b, strict=True) if x == y) / n
    freq_a = Counter(labels_a)
    freq_b = Counter(labels_b)
    p_e = sum(freq_a[c] * freq_b[c] for c in freq_a) / (n * n)
    if p_e >= 1.0:
        return 1.0
    return (p_o - p_e) / (1.0 - p_e)


def krippendorff_alpha_nominal(units: Sequence[Sequence[Hashable | None]]) -> float:
    """Krippendorff's alpha for nominal data.

    ``units[u]`` is the list of values the coders gave unit (item) ``u``, one entry per coder
    in any fixed coder order, with ``None`` where that coder did not label the unit. Lists may
    have different lengths (only the non-missing values matter). Units with fewer than two
    values are not pairable and are ignored, as the method prescribes.

    Computed from the coincidence matrix: ``o[c][k] = sum_u (#c-k pairs in u) / (m_u - 1)``,
    ``n_c = sum_k o[c][k]``, ``n = sum_c n_c``, and
    ``alpha = 1 - (n - 1) * sum_{c != k} o[c][k] / sum_{c != k} n_c * n_k``.

    Raises ``ValueError`` when no unit is pairable. When every pairable value is the same
    category the expected disagreement is zero and alpha is 0/0; this function returns 1.0
    then (there is no disagreement at all).
    """
    coincidence: dict[tuple[Hashable, Hashable], float] = defaultdict(float)
    for unit in units:
        values = [v for v in unit if v is not None]
        m = len(values)
        if m < 2:
            continue
        counts = Counter(values)
        for c, n_c_u in counts.items():
            for k, n_k_u in counts.items():
                pairs = n_c_u * (n_c_u - 1) if c == k else n_c_u * n_k_u
                if pairs:
                    coincidence[(c, k)] += pairs / (m - 1)
    if not coincidence:
        raise ValueError("no unit has two or more values; alpha is undefined")
    marginals: dict[Hashable, float] = defaultdict(float)
    for (c, _k), o in coincidence.items():
        marginals[c] += o
    n = sum(marginals.values())
    observed = sum(o for (c, k), o in coincidence.items() if c != k)
    total_sq = sum(marginals.values()) ** 2
    expected = total_sq - sum(v * v for v in marginals.values())  # sum_{c != k} n_c n_k
    if expected == 0:
        return 1.0
    return 1.0 - (n - 1) * observed / expected


def gold_accuracy(votes: Iterable[tuple[Hashable, Hashable | None]]) -> float | None:
    """Fraction of gold (control) votes answered correctly.

    ``votes`` holds ``(choice, gold)`` pairs: ``choice`` is what the annotator voted and
    ``gold`` the known correct answer, or ``None`` for a vote on an ordinary (non-gold) pair,
    which is skipped. Returns ``None`` when there is no gold vote.
    """
    seen = correct = 0
    for choice, gold in votes:
        if gold is None:
            continue
        seen += 1
        correct += choice == gold
    return correct / seen if seen else None


class VoteRecord(NamedTuple):
    """One vote, as :func:`annotator_reliability` expects it.

    * ``user_id``: the annotator.
    * ``pair_id``: the pair voted on (used only to count distinct pairs; may repeat across
      users).
    * ``choice``: the annotator's choice.
    * ``reference``: what the vote is compared with. For a gold pair (``is_gold=True``) the
      known correct answer. For an ordinary pair the majority choice of the *other*
      annotators of that pair (leave-one-out, see :func:`leave_one_out_majority`), or
      ``None`` when there is none (nobody else voted, or the others are split evenly), in
      which case the vote counts toward volume only.
    * ``is_gold``: whether the pair is a control pair with a known answer. Plain 4-tuples
      ``(user_id, pair_id, choice, reference)`` are accepted and mean ``is_gold=False``.
    """

    user_id: int
    pair_id: int
    choice: Hashable
    reference: Hashable | None
    is_gold: bool = False


@dataclass
class AnnotatorReliability:
    """Reliability of one annotator.

    * ``votes``: all votes by the annotator.
    * ``gold_seen`` / ``gold_correct`` / ``gold_accuracy``: votes on gold pairs, how many
      matched the gold answer, and their ratio (``None`` when ``gold_seen == 0``).
    * ``compared`` / ``agreed`` / ``agreement_with_majority``: ordinary votes that had a
      majority reference, how many matched it, and their ratio (``None`` when
      ``compared == 0``).
    * ``p_value``: one-sided exact binomial p-value ``P(X <= k)`` with
      ``X ~ Binomial(n, p0)``, where ``k`` and ``n`` are the annotator's matches and
      comparisons over gold *and* majority references together, and ``p0`` is the match rate
      of all *other* annotators pooled. ``None`` when the test cannot be run (``n == 0`` or no
      other annotator has comparisons).
    * ``outlier``: ``p_value < alpha`` (agreement significantly below the population's).
    """

    user_id: int
    votes: int
    gold_seen: int
    gold_correct: int
    gold_accuracy: float | None
    compared: int
    agreed: int
    agreement_with_majority: float | None
    p_value: float | None
    outlier: bool


def binomial_cdf(k: int, n: int, p: float) -> float:
    """Exact ``P(X <= k)`` for ``X ~ Binomial(n, p)``, summed in log space.

    Each term ``C(n, i) p^i (1-p)^(n-i)`` is formed as a logarithm (``math.lgamma``) and the
    terms are combined with a log-sum-exp, so large ``n`` neither overflows nor underflows
    to a wrong answer.
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    if not 0.0 <= p <= 1.0:
        raise ValueError("p must be in [0, 1]")
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    if p == 0.0:
        return 1.0
    if p == 1.0:
        return 0.0  # k < n here, and X == n surely
    log_p, log_q = math.log(p), math.log1p(-p)
    log_n_fact = math.lgamma(n + 1)
    logs = [
        log_n_fact - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q
        for i in range(k + 1)
    ]
    top = max(logs)
    return min(1.0, math.exp(top) * math.fsum(math.exp(x - top) for x in logs))


def leave_one_out_majority(
    votes: Iterable[tuple[int, int, Hashable]],
) -> dict[tuple[int, int], Hashable | None]:
    """Majority choice of the *other* annotators, for every ``(user_id, pair_id)``.

    ``votes`` holds ``(user_id, pair_id, choice)`` triples, at most one per user and pair
    (a repeated one is a ``ValueError``). For each vote the result holds the strict
    plurality choice among the other votes on the same pair, or ``None`` when there are no
    other votes or the top choices are tied.
    """
    by_pair: dict[int, dict[int, Hashable]] = defaultdict(dict)
    for user_id, pair_id, choice in votes:
        if user_id in by_pair[pair_id]:
            raise ValueError(f"user {user_id} voted twice on pair {pair_id}")
        by_pair[pair_id][user_id] = choice
    out: dict[tuple[int, int], Hashable | None] = {}
    for pair_id, user_choices in by_pair.items():
        counts = Counter(user_choices.values())
        for user_id, choice in user_choices.items():
            counts[choice] -= 1
            ranked = [(c, n) for c, n in counts.most_common() if n > 0]
            if not ranked or (len(ranked) > 1 and ranked[0][1] == ranked[1][1]):
                out[(user_id, pair_id)] = None
            else:
                out[(user_id, pair_id)] = ranked[0][0]
            counts[choice] += 1
    return out


def annotator_reliability(
    records: Iterable[VoteRecord | tuple], *, alpha: float = OUTLIER_ALPHA
) -> list[AnnotatorReliability]:
    """Per-annotator reliability, sorted by ``user_id``.

    ``records``: one :class:`VoteRecord` (or equivalent 4- or 5-tuple
    ``(user_id, pair_id, choice, reference[, is_gold])``) per vote; see :class:`VoteRecord`
    for the meaning of each field. ``alpha``: significance level of the one-sided bad-voter
    test (default 0.01); an annotator is flagged when its match rate against the references
    is significantly below that of everyone else (see :class:`AnnotatorReliability`).
    """
    per_user: dict[int, list[int]] = {}
    # [votes, gold_seen, gold_correct, compared, agreed]
    for raw in records:
        rec = raw if isinstance(raw, VoteRecord) else VoteRecord(*raw)
        s = per_user.setdefault(rec.user_id, [0, 0, 0, 0, 0])
        s[0] += 1
        if rec.is_gold:
            if rec.reference is None:
                raise ValueError(
                    f"gold vote of user {rec.user_id} on pair {rec.pair_id} has no gold answer"
                )
            s[1] += 1
            s[2] += rec.choice == rec.reference
        elif rec.reference is not None:
            s[3] += 1
            s[4] += rec.choice == rec.reference
    total_n = sum(s[1] + s[3] for s in per_user.values())
    total_k = sum(s[2] + s[4] for s in per_user.values())
    out = []
    for user_id in sorted(per_user):
        votes, gold_seen, gold_correct, compared, agreed = per_user[user_id]
        n = gold_seen + compared
        k = gold_correct + agreed
        others_n = total_n - n
        p_value: float | None = None
        if n > 0 and others_n > 0:
            p0 = (total_k - k) / others_n
            p_value = binomial_cdf(k, n, p0)
        out.append(
            AnnotatorReliability(
                user_id=user_id,
                votes=votes,
                gold_seen=gold_seen,
                gold_correct=gold_correct,
                gold_accuracy=gold_correct / gold_seen if gold_seen else None,
                compared=compared,
                agreed=agreed,
                agreement_with_majority=agreed / compared if compared else None,
                p_value=p_value,
                outlier=p_value is not None and p_value < alpha,
            )
        )
    return out


def annotator_alpha(
    votes: Iterable[tuple[int, int, Hashable]],
) -> tuple[float | None, dict[int, float]]:
    """Krippendorff's alpha (nominal) overall and per annotator, in one pass.

    ``votes`` holds ``(user_id, unit_id, value)``, at most one per user and unit. Within a unit
    with ``m >= 2`` values, each value is compared with the ``m - 1`` others, each comparison
    weighing ``1 / (m - 1)``, so every pairable value carries weight 1 and its *disagreement*
    ``d`` is the share of the others that differ. With ``D_e`` the disagreement expected from
    the pooled label frequencies (``sum_{c != k} n_c n_k / (n (n - 1))``):

    * overall ``alpha = 1 - mean(d) / D_e`` over all pairable values, which is exactly
      :func:`krippendorff_alpha_nominal`;
    * annotator ``j``'s ``alpha_j = 1 - mean(d over j's values) / D_e``: the same statistic
      restricted to the comparisons that involve ``j``. The overall alpha is the mean of the
      ``alpha_j`` weighted by each annotator's pairable values.

    Returns ``(None, {})`` when no unit has two values; when every value is the same
    (``D_e = 0``) every alpha is 1.0, as in :func:`krippendorff_alpha_nominal`.
    """
    by_unit: dict[int, dict[int, Hashable]] = defaultdict(dict)
    for user_id, unit_id, value in votes:
        if user_id in by_unit[unit_id]:
            raise ValueError(f"user {user_id} labelled unit {unit_id} twice")
        by_unit[unit_id][user_id] = value
    totals: Counter[Hashable] = Counter()
    per_user: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])  # [sum d, values]
    for coders in by_unit.values():
        m = len(coders)
        if m < 2:
            continue
        counts = Counter(coders.values())
        totals.update(counts)
        for user_id, value in coders.items():
            s = per_user[user_id]
            s[0] += (m - counts[value]) / (m - 1)
            s[1] += 1
    n = sum(totals.values())
    if n == 0:
        return None, {}
    d_e = (n * n - sum(c * c for c in totals.values())) / (n * (n - 1))
    if d_e == 0:
        return 1.0, {u: 1.0 for u in per_user}
    overall = 1.0 - sum(s[0] for s in per_user.values()) / n / d_e
    return overall, {u: 1.0 - (s[0] / s[1]) / d_e for u, s in sorted(per_user.items())}


def pairwise_kappa(
    votes: Iterable[tuple[int, int, Hashable]], *, min_overlap: int
) -> list[tuple[int, int, int, float]]:
    """Cohen's kappa of every two annotators who share at least ``min_overlap`` units.

    ``votes`` holds ``(user_id, unit_id, value)``. Returns ``(user_a, user_b, overlap, kappa)``
    with ``user_a < user_b``, the largest overlap first (then by ids)."""
    by_unit: dict[int, dict[int, Hashable]] = defaultdict(dict)
    for user_id, unit_id, value in votes:
        by_unit[unit_id][user_id] = value
    shared: dict[tuple[int, int], tuple[list[Hashable], list[Hashable]]] = defaultdict(
        lambda: ([], [])
    )
    for coders in by_unit.values():
        users = sorted(coders)
        for i, a in enumerate(users):
            for b in users[i + 1 :]:
                la, lb = shared[(a, b)]
                la.append(coders[a])
                lb.append(coders[b])
    out = [
        (a, b, len(la), cohen_kappa(la, lb))
        for (a, b), (la, lb) in shared.items()
        if len(la) >= min_overlap
    ]
    out.sort(key=lambda t: (-t[2], t[0], t[1]))
    return out


#: An annotator needs this many gold votes before gold accuracy can flag them.
FLAG_MIN_GOLD = 5
#: ... and this many timed votes before speed can flag them.
FLAG_MIN_TIMED = 5
#: The share of implausibly fast votes that flags an annotator.
FLAG_FAST_SHARE = 0.5


def flag_reasons(
    rel: AnnotatorReliability | None,
    *,
    fast_votes: int,
    timed_votes: int,
    gold_floor: float,
) -> list[str]:
    """Why an annotator is unreliable; empty when they are not.

    * ``"gold"``: at least :data:`FLAG_MIN_GOLD` gold votes and a gold accuracy below
      ``gold_floor``;
    * ``"outlier"``: the bad-voter test of :func:`annotator_reliability` (agreement
      significantly below everyone else's);
    * ``"fast"``: at least :data:`FLAG_MIN_TIMED` votes with a latency, and at least
      :data:`FLAG_FAST_SHARE` of them implausibly fast (``fast_votes`` of ``timed_votes``).
    """
    reasons = []
    if rel is not None:
        if (
            rel.gold_seen >= FLAG_MIN_GOLD
            and rel.gold_accuracy is not None
            and rel.gold_accuracy < gold_floor
        ):
            reasons.append("gold")
        if rel.outlier:
            reasons.append("outlier")
    if timed_votes >= FLAG_MIN_TIMED and fast_votes >= FLAG_FAST_SHARE * timed_votes:
        reasons.append("fast")
    return reasons
