"""How a pair's votes become training labels: the label rules of a round (``label_rule``).

Pure functions (standard library only): no database, no torch. The round's snapshot
(:func:`backend.services.rounds.label_snapshot`) reads the training votes and calls
:func:`aggregate`; ``bench/data_quality.py`` calls it on a simulated crowd.

A vote is a :class:`PairVote`: the pair, the annotator, and the label in *pair terms*:
``"a"`` (image *a* is better), ``"b"``, or ``"tie"`` (ties reach a rule only when the round
trains on ties). The rules, each a small function in :data:`RULES`:

* ``each`` (:func:`label_each`): every vote is its own training label, today's behaviour. Two
  contradicting votes on one pair both train (they cancel in the loss); they are counted as
  ``contradicted_pairs`` but kept.
* ``majority`` (:func:`label_majority`): one label per pair, the strict plurality of its
  votes over ``a`` / ``b`` / ``tie``. When the top two labels have the same count (``a`` vs
  ``b`` 1-1, or ``a`` vs ``tie``) the pair is *contested* and dropped: no label is better
  than a coin flip. A plurality of ``tie`` makes a tie label.
* ``dawid_skene`` (:func:`label_dawid_skene`): one label per pair from the one-coin
  Dawid–Skene model: each annotator ``j`` is right with probability ``p_j`` whatever the
  pair, the true label is ``a`` or ``b`` with prior 1/2, and EM alternates the pairs'
  posteriors with the annotators' accuracies (Laplace-smoothed). A pair's label is the sign of
  its posterior log-odds ``sum_j ±log(p_j / (1 - p_j))``, so an annotator below 1/2 (an
  adversary) counts *against* what they vote and a random voter (``p ≈ 1/2``) counts for
  nothing. ``tie`` votes abstain; a pair whose votes are all ties is a tie label; a pair whose
  log-odds are exactly 0 (a perfect contradiction) is contested and dropped.

Every rule returns an :class:`Aggregation`: the labels, and the counts a round's metrics
report (``pairs_in`` / ``votes_in`` / ``pairs_kept`` / ``votes_kept`` / ``contested_pairs`` /
``contradicted_pairs``).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

LabelRule = Literal["each", "majority", "dawid_skene"]
LABELS = ("a", "b", "tie")

#: EM iterations of :func:`label_dawid_skene` (it stops earlier once the accuracies settle).
DS_ITERATIONS = 50
#: Accuracies are kept inside ``[DS_CLIP, 1 - DS_CLIP]`` so one annotator's weight stays finite.
DS_CLIP = 0.01


class PairVote(NamedTuple):
    """One vote: ``label`` is ``"a"``, ``"b"`` or ``"tie"`` (in pair terms, not sides)."""

    pair_id: int
    user_id: int
    label: str


class PairLabel(NamedTuple):
    """One training label. ``votes``: the votes on the pair the rule used; ``confidence``:
    the share of them that agree (``each``: 1.0 per vote; ``majority``: the plurality's
    share; ``dawid_skene``: the posterior probability of the label)."""

    pair_id: int
    label: str
    votes: int
    confidence: float


@dataclass
class Aggregation:
    """The labels of one rule and what it kept."""

    rule: str
    labels: list[PairLabel]
    pairs_in: int
    votes_in: int
    pairs_kept: int
    votes_kept: int
    contested_pairs: int
    contradicted_pairs: int
    #: ``dawid_skene`` only: each annotator's estimated accuracy ``p_j``.
    reliability: dict[int, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The counts, for a round's metrics (``metrics["labels"]``)."""
        return {
            "rule": self.rule,
            "pairs_in": self.pairs_in,
            "votes_in": self.votes_in,
            "pairs_kept": self.pairs_kept,
            "votes_kept": self.votes_kept,
            "contested_pairs": self.contested_pairs,
            "contradicted_pairs": self.contradicted_pairs,
        }


def _by_pair(votes: Iterable[PairVote]) -> dict[int, list[PairVote]]:
    by_pair: dict[int, list[PairVote]] = defaultdict(list)
    for v in votes:
        if v.label not in LABELS:
            raise ValueError(f"vote label must be one of {LABELS}, not {v.label!r}")
        by_pair[v.pair_id].append(v)
    return by_pair


def _contradicted(pair_votes: list[PairVote]) -> bool:
    labels = {v.label for v in pair_votes}
    return "a" in labels and "b" in labels


def label_each(votes: Iterable[PairVote]) -> Aggregation:
    """Every vote is a label (``confidence`` 1.0)."""
    by_pair = _by_pair(votes)
    labels = [PairLabel(v.pair_id, v.label, 1, 1.0) for vs in by_pair.values() for v in vs]
    return Aggregation(
        rule="each",
        labels=labels,
        pairs_in=len(by_pair),
        votes_in=len(labels),
        pairs_kept=len(by_pair),
        votes_kept=len(labels),
        contested_pairs=0,
        contradicted_pairs=sum(_contradicted(vs) for vs in by_pair.values()),
    )


def label_majority(votes: Iterable[PairVote]) -> Aggregation:
    """One label per pair: the strict plurality; a tie at the top drops the pair."""
    by_pair = _by_pair(votes)
    labels: list[PairLabel] = []
    contested = votes_kept = 0
    for pair_id, vs in by_pair.items():
        ranked = Counter(v.label for v in vs).most_common()
        if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
            contested += 1
            continue
        labels.append(PairLabel(pair_id, ranked[0][0], len(vs), ranked[0][1] / len(vs)))
        votes_kept += len(vs)
    return Aggregation(
        rule="majority",
        labels=labels,
        pairs_in=len(by_pair),
        votes_in=sum(len(vs) for vs in by_pair.values()),
        pairs_kept=len(labels),
        votes_kept=votes_kept,
        contested_pairs=contested,
        contradicted_pairs=sum(_contradicted(vs) for vs in by_pair.values()),
    )


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def dawid_skene_accuracies(
    votes: Iterable[PairVote], *, iterations: int = DS_ITERATIONS, tol: float = 1e-9
) -> tuple[dict[int, float], dict[int, float]]:
    """One-coin Dawid–Skene by EM over the ``a`` / ``b`` votes (ties abstain).

    Returns ``(accuracy, posterior)``: each annotator's accuracy ``p_j`` and each pair's
    posterior probability that ``a`` is the right label. Start: each pair's posterior is the
    share of its ``a`` votes (the soft majority). M-step:
    ``p_j = (sum_i agree_ij + 1) / (n_j + 2)`` with ``agree_ij = q_i`` for an ``a`` vote and
    ``1 - q_i`` for a ``b`` vote, clipped to ``[DS_CLIP, 1 - DS_CLIP]``. E-step:
    ``q_i = sigmoid(sum_j s_ij log(p_j / (1 - p_j)))`` with ``s_ij = +1`` for ``a``, ``-1``
    for ``b``. ``iterations`` M/E rounds at most; stops when no accuracy moves by ``tol``.
    """
    binary = [v for v in votes if v.label in ("a", "b")]
    by_pair: dict[int, list[PairVote]] = defaultdict(list)
    by_user: dict[int, list[PairVote]] = defaultdict(list)
    for v in binary:
        by_pair[v.pair_id].append(v)
        by_user[v.user_id].append(v)
    q = {p: sum(v.label == "a" for v in vs) / len(vs) for p, vs in by_pair.items()}
    acc: dict[int, float] = {}
    for _ in range(iterations):
        new = {}
        for u, vs in by_user.items():
            agree = sum(q[v.pair_id] if v.label == "a" else 1.0 - q[v.pair_id] for v in vs)
            new[u] = min(1.0 - DS_CLIP, max(DS_CLIP, (agree + 1.0) / (len(vs) + 2.0)))
        weight = {u: math.log(p / (1.0 - p)) for u, p in new.items()}
        q = {
            p: _sigmoid(sum(weight[v.user_id] * (1 if v.label == "a" else -1) for v in vs))
            for p, vs in by_pair.items()
        }
        settled = bool(acc) and all(abs(new[u] - acc[u]) < tol for u in new)
        acc = new
        if settled:
            break
    return acc, q


def label_dawid_skene(votes: Iterable[PairVote], *, iterations: int = DS_ITERATIONS) -> Aggregation:
    """One label per pair from :func:`dawid_skene_accuracies` (see the module docstring)."""
    by_pair = _by_pair(votes)
    all_votes = [v for vs in by_pair.values() for v in vs]
    acc, q = dawid_skene_accuracies(all_votes, iterations=iterations)
    labels: list[PairLabel] = []
    contested = votes_kept = 0
    for pair_id, vs in by_pair.items():
        if pair_id not in q:  # only tie votes
            labels.append(PairLabel(pair_id, "tie", len(vs), 1.0))
            votes_kept += len(vs)
            continue
        used = sum(v.label != "tie" for v in vs)
        posterior = q[pair_id]
        if abs(posterior - 0.5) < 1e-12:
            contested += 1
            continue
        label = "a" if posterior > 0.5 else "b"
        labels.append(PairLabel(pair_id, label, used, max(posterior, 1.0 - posterior)))
        votes_kept += used
    return Aggregation(
        rule="dawid_skene",
        labels=labels,
        pairs_in=len(by_pair),
        votes_in=len(all_votes),
        pairs_kept=len(labels),
        votes_kept=votes_kept,
        contested_pairs=contested,
        contradicted_pairs=sum(_contradicted(vs) for vs in by_pair.values()),
        reliability=acc,
    )


RULES: Mapping[str, Callable[[Iterable[PairVote]], Aggregation]] = {
    "each": label_each,
    "majority": label_majority,
    "dawid_skene": label_dawid_skene,
}


def aggregate(votes: Iterable[PairVote], rule: str) -> Aggregation:
    """The labels of ``votes`` under ``rule`` (one of :data:`RULES`)."""
    if rule not in RULES:
        raise ValueError(f"unknown label rule {rule!r}; one of {sorted(RULES)}")
    return RULES[rule](votes)
