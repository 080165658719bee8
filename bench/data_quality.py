"""A simulated crowd with planted bad voters: how good are the training labels of each rule?

No model and no database: pairs have a synthetic ground truth (``a`` or ``b``, a fair coin),
and annotators of three kinds vote on them:

- **good** (the rest of the crowd): right with probability ``--good-accuracy`` (0.85), each
  vote taking a lognormal 2.5 s (median) to answer;
- **random** (``--random-rate``, 20%): a coin flip, answered in a lognormal 0.35 s (the
  clicker who does not look), or at the good voters' pace with ``--random-pace normal``;
- **adversarial** (``--adversarial-rate``, 10%): right with probability
  ``--adversarial-accuracy`` (0.15), at a normal pace: they look, then answer the other way.

Every pair is voted on by ``--overlap`` (3, the server's ``pair_overlap``) annotators drawn
at random, each annotator's share of the work equal. ``--gold-rate`` (10%) of the pairs are
gold (their answer known, as the server's control pairs): they never become training labels
but feed the gold-accuracy flag.

The report, over ``--seeds`` crowds (mean ± standard deviation):

- **label accuracy**: the share of training labels that match the ground truth, and how many
  labels (and pairs) each rule kept, for ``each``, ``majority`` and ``dawid_skene``
  (:mod:`backend.aggregation`), with and without the flagged annotators' votes
  (the round's ``exclude_flagged``);
- **flag rates**: the share of each kind of annotator that :func:`backend.agreement.flag_reasons`
  flags (gold accuracy below the floor, the outlier test, implausibly fast votes), the same
  functions the server's ``GET /users`` uses, with the server's default thresholds.

    python -m bench.data_quality            # 300 annotators, 20,000 pairs, 3 seeds
    python -m bench.data_quality --quick    # 100 annotators, 3,000 pairs, 3 seeds (seconds)
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass

from backend import aggregation, agreement
from backend.settings import Settings

KINDS = ("good", "random", "adversarial")


@dataclass
class Crowd:
    kinds: dict[int, str]
    truth: dict[int, str]
    gold: set[int]
    votes: list[tuple[int, int, str, int]]  # (user, pair, label, latency_ms)


def simulate(args: argparse.Namespace, seed: int) -> Crowd:
    rng = random.Random(seed)
    n = args.annotators
    n_random = round(n * args.random_rate)
    n_adv = round(n * args.adversarial_rate)
    kinds_list = ["random"] * n_random + ["adversarial"] * n_adv + ["good"] * (n - n_random - n_adv)
    rng.shuffle(kinds_list)
    kinds = dict(enumerate(kinds_list))
    truth = {p: rng.choice("ab") for p in range(args.pairs)}
    gold = {p for p in truth if rng.random() < args.gold_rate}
    votes = []
    for p, right in truth.items():
        wrong = "b" if right == "a" else "a"
        for u in rng.sample(range(n), args.overlap):
            kind = kinds[u]
            if kind == "random":
                label = rng.choice("ab")
                median = 350 if args.random_pace == "fast" else 2500
                latency = rng.lognormvariate(math.log(median), 0.4)
            else:
                acc = args.good_accuracy if kind == "good" else args.adversarial_accuracy
                label = right if rng.random() < acc else wrong
                latency = rng.lognormvariate(math.log(2500), 0.5)
            votes.append((u, p, label, int(latency)))
    return Crowd(kinds, truth, gold, votes)


def flags(crowd: Crowd, settings: Settings) -> dict[int, list[str]]:
    """The server's flags (backend.services.quality, without the database)."""
    plain = [(u, p, label) for u, p, label, _ in crowd.votes if p not in crowd.gold]
    loo = agreement.leave_one_out_majority(plain)
    records = [
        agreement.VoteRecord(
            u,
            p,
            label,
            crowd.truth[p] if p in crowd.gold else loo.get((u, p)),
            p in crowd.gold,
        )
        for u, p, label, _ in crowd.votes
    ]
    rel = {r.user_id: r for r in agreement.annotator_reliability(records)}
    timing: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for u, _p, _label, latency in crowd.votes:
        timing[u][1] += 1
        timing[u][0] += latency < settings.fast_vote_ms
    return {
        u: agreement.flag_reasons(
            rel.get(u),
            fast_votes=timing[u][0],
            timed_votes=timing[u][1],
            gold_floor=settings.gold_accuracy_floor,
        )
        for u in crowd.kinds
    }


def label_accuracy(crowd: Crowd, rule: str, exclude: set[int]) -> tuple[float, int, int]:
    """(share of training labels matching the truth, labels, pairs kept)."""
    votes = [
        aggregation.PairVote(p, u, label)
        for u, p, label, _ in crowd.votes
        if p not in crowd.gold and u not in exclude
    ]
    result = aggregation.aggregate(votes, rule)
    right = sum(lab.label == crowd.truth[lab.pair_id] for lab in result.labels)
    return right / max(1, len(result.labels)), len(result.labels), result.pairs_kept


def _ms(xs: list[float], pct: bool = True) -> str:
    f = 100.0 if pct else 1.0
    m = statistics.fmean(xs) * f
    sd = statistics.stdev(xs) * f if len(xs) > 1 else 0.0
    return f"{m:6.1f} ± {sd:4.1f}" if pct else f"{m:9.0f} ± {sd:5.0f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="100 annotators, 3,000 pairs")
    ap.add_argument("--annotators", type=int, default=300)
    ap.add_argument("--pairs", type=int, default=20_000)
    ap.add_argument("--overlap", type=int, default=3)
    ap.add_argument("--random-rate", type=float, default=0.2)
    ap.add_argument("--adversarial-rate", type=float, default=0.1)
    ap.add_argument("--good-accuracy", type=float, default=0.85)
    ap.add_argument("--adversarial-accuracy", type=float, default=0.15)
    ap.add_argument("--gold-rate", type=float, default=0.1)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument(
        "--random-pace",
        choices=("fast", "normal"),
        default="fast",
        help="fast: random voters answer in ~0.35 s; normal: at the good voters' pace, so only "
        "the gold and outlier tests can find them",
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.annotators, args.pairs = 100, 3_000
    if args.random_rate + args.adversarial_rate > 1 or args.overlap > args.annotators:
        ap.error("rates must sum to at most 1, and overlap must not exceed the annotators")
    settings = Settings()
    started = time.monotonic()
    acc: dict[tuple[str, bool], list[float]] = defaultdict(list)
    kept: dict[tuple[str, bool], list[float]] = defaultdict(list)
    pairs_kept: dict[tuple[str, bool], list[float]] = defaultdict(list)
    flag_rate: dict[str, list[float]] = defaultdict(list)
    for seed in range(args.seeds):
        crowd = simulate(args, seed)
        f = flags(crowd, settings)
        flagged = {u for u, reasons in f.items() if reasons}
        for kind in KINDS:
            members = [u for u, k in crowd.kinds.items() if k == kind]
            if members:
                flag_rate[kind].append(sum(u in flagged for u in members) / len(members))
        for rule in aggregation.RULES:
            for excl in (False, True):
                a, n_labels, n_pairs = label_accuracy(crowd, rule, flagged if excl else set())
                acc[(rule, excl)].append(a)
                kept[(rule, excl)].append(n_labels)
                pairs_kept[(rule, excl)].append(n_pairs)
    n_train = round(args.pairs * (1 - args.gold_rate))
    print(
        f"crowd: {args.annotators} annotators ({args.random_rate:.0%} random, "
        f"{args.random_pace} pace, {args.adversarial_rate:.0%} adversarial at {args.adversarial_accuracy:.0%} right, "
        f"good at {args.good_accuracy:.0%}), {args.pairs} pairs (~{n_train} training, "
        f"{args.gold_rate:.0%} gold), {args.overlap} votes per pair, {args.seeds} seeds; "
        f"fast_vote_ms={settings.fast_vote_ms}, gold floor {settings.gold_accuracy_floor}"
    )
    print()
    print(f"{'rule':<12} {'flagged out':<12} {'label accuracy %':>17} {'labels':>17} {'pairs':>17}")
    for rule in aggregation.RULES:
        for excl in (False, True):
            k = (rule, excl)
            print(
                f"{rule:<12} {'yes' if excl else 'no':<12} {_ms(acc[k]):>17} "
                f"{_ms(kept[k], pct=False):>17} {_ms(pairs_kept[k], pct=False):>17}"
            )
    print()
    print(f"{'annotators':<12} {'flagged %':>15}")
    for kind in KINDS:
        if flag_rate[kind]:
            print(f"{kind:<12} {_ms(flag_rate[kind]):>15}")
    print(f"\n{time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
