"""Active choice of pairs against uniform choice, at the same vote budget (issue 12, item 6).

    python -m bench.active --quick     # 1 seed, 32 votes, 24 units (about 2 min on an idle machine)
    python -m bench.active             # brightness, 3 seeds, 500 votes, 192 test units, 4 candidates
    python -m bench.active --taste size --candidates 2

Each seed runs two rounds of the product (``bench.taste_rounds.run_cell``: the built-in
family's default round config, its held-out split, early stopping, drift budget and fidelity
probe) on the same number of votes by the same simulated annotators
(``fidelity:1,<taste>:1`` with 10% label noise):

- **uniform**: the pool as it is by default: each pair a random training-split prompt with two
  random seeds (``PREFLOOP_PAIR_ACTIVE_SHARE=0``);
- **active**: ``PREFLOOP_PAIR_ACTIVE_SHARE=1``: per pool batch of ``n`` pairs (32, as
  ``worker.pair_pool``), ``--candidates`` x ``n`` candidate pairs drawn the same way, of which
  the ``n`` whose two images differ most (``backend.active.pair_distance``) are voted on.

Both arms come from one candidate draw: the uniform arm's pairs are the first ``n`` of each
batch's candidates (i.i.d. draws, so a uniform sample), the active arm's the ``n`` most
different of them; the same votes' random numbers, the same evaluation units. The active arm
samples ``--candidates`` times as many images for the same votes: that is its cost.

Reported per seed and arm: the **taste gain** (mean over the evaluation units of the taste's
score, candidate minus parent on the same seed, with a paired 95% interval over units), the
blind A/B win rate against the parent (Wilson 95%), the judge's change, the votes' ties and
the mean pair distance of the voted pairs. Over seeds: each arm's mean taste gain and the mean
of the per-seed difference, active minus uniform, with a t interval over seeds (95%, n - 1
degrees of freedom; none with one seed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench import taste_rounds as tr

DEFAULT_TASTE = "brightness"
#: Pairs per pool batch (``worker.pair_pool.BATCH_PAIRS``): active choice picks within one.
POOL_BATCH = 32
#: Two-sided 95% quantiles of Student's t, by degrees of freedom.
T975 = dict(
    enumerate(
        (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)
        + (2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086)
        + (2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042),
        start=1,
    )
)


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (1.96 beyond 30)."""
    if df < 1:
        raise ValueError("df must be >= 1")
    return T975.get(df, 1.96)


def seed_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t interval over seeds (NaN bounds with a single value)."""
    x = np.asarray(values, dtype=np.float64)
    mean = float(x.mean())
    if len(x) < 2:
        return mean, float("nan"), float("nan")
    half = t975(len(x) - 1) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return mean, mean - half, mean + half


def arms(
    distances: list[float], votes: int, candidates: int, batch: int = POOL_BATCH
) -> tuple[list[int], list[int]]:
    """``(uniform, active)``: the candidate indices each arm votes on, ``votes`` each.

    Candidates come in pool batches: a batch of ``n = min(batch, votes left)`` pairs has
    ``candidates * n`` candidates; the uniform arm takes its first ``n``, the active arm its
    ``n`` most different (``backend.active.choose_pairs``)."""
    from backend.active import choose_pairs

    if len(distances) != votes * candidates:
        raise ValueError(f"{len(distances)} distances for {votes} votes x {candidates}")
    uniform: list[int] = []
    active: list[int] = []
    start = 0
    left = votes
    while left > 0:
        n = min(batch, left)
        chunk = distances[start : start + candidates * n]
        uniform += [start + i for i in range(n)]
        active += [start + i for i in choose_pairs(chunk, n)]
        start += candidates * n
        left -= n
    return uniform, active


@dataclass(frozen=True)
class Options:
    taste: str = DEFAULT_TASTE
    candidates: int = 4
    rounds: tr.Settings = dataclasses.field(default_factory=tr.Settings)


def run_seed(
    seed: int, o: Options, out: Path, fp: str, parent_images: np.ndarray, units: Any
) -> dict[str, Any]:
    from backend.active import pair_distance
    from worker.shapes.model import load_builtin

    s = o.rounds
    base = load_builtin(None)
    prompts, images = tr.vote_images(
        base, seed, dataclasses.replace(s, votes=s.votes * o.candidates), out, fp
    )
    dist = [pair_distance(a, b) for a, b in images]
    uniform, active = arms(dist, s.votes, o.candidates)
    row: dict[str, Any] = {"seed": seed}
    for name, idx in (("uniform", uniform), ("active", active)):
        cell = tr.run_cell(
            None,
            o.taste,
            seed,
            s,
            out,
            fp,
            parent_images,
            units,
            votes=([prompts[i] for i in idx], images[idx]),
            tag=f"-{name}-c{o.candidates}",
        )
        row[name] = asdict(cell) | {"distance": float(np.mean([dist[i] for i in idx]))}
    return row


def _arm(c: dict[str, Any]) -> str:
    taste = f"{c['taste_gain']:+.4f} [{c['taste_lo']:+.4f}, {c['taste_hi']:+.4f}]"
    return (
        f"{taste:>28}{c['win_rate']:>7.2f}{c['judge_delta']:>+8.3f}{c['ties']:>5}"
        f"{c['distance']:>7.3f}"
    )


def format_table(rows: list[dict[str, Any]], taste: str) -> str:
    arm_head = f"{'taste Δ [95% CI]':>28}{'A/B':>7}{'judge Δ':>8}{'ties':>5}{'dist':>7}"
    head = f"{'seed':>4} |{arm_head} |{arm_head} | {'active − uniform':>16}"
    top = f"{'':>4} |{'uniform':^55} |{'active':^55} |"
    lines = [f"taste: {taste}", top, head, "-" * len(head)]
    diffs = []
    for r in rows:
        d = r["active"]["taste_gain"] - r["uniform"]["taste_gain"]
        diffs.append(d)
        lines.append(f"{r['seed']:>4} |{_arm(r['uniform'])} |{_arm(r['active'])} | {d:>+16.4f}")
    lines.append("-" * len(head))

    def fmt(m: float, lo: float, hi: float) -> str:
        return f"{m:+.4f}" + ("" if math.isnan(lo) else f" [{lo:+.4f}, {hi:+.4f}]")

    u = seed_interval([r["uniform"]["taste_gain"] for r in rows])
    a = seed_interval([r["active"]["taste_gain"] for r in rows])
    d = seed_interval(diffs)
    n = len(rows)
    lines.append(f"mean over {n} seed(s), 95% t interval over seeds:")
    lines.append(f"  uniform taste Δ {fmt(*u)}")
    lines.append(f"  active  taste Δ {fmt(*a)}")
    lines.append(f"  active − uniform {fmt(*d)}")
    if n < 2:
        verdict = "one seed: no interval, no verdict"
    elif d[1] > 0:
        verdict = "active choice gains taste (interval above 0)"
    elif d[2] < 0:
        verdict = "active choice loses taste (interval below 0)"
    else:
        verdict = "no measurable difference (interval contains 0)"
    lines.append(f"  verdict: {verdict}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="1 seed, 32 votes, 24 units, small probe")
    p.add_argument("--taste", default=DEFAULT_TASTE)
    p.add_argument("--candidates", type=int, default=Options.candidates)
    p.add_argument("--seeds", type=int, default=tr.Settings.seeds)
    p.add_argument("--votes", type=int, default=tr.Settings.votes)
    p.add_argument("--units", type=int, default=tr.Settings.units)
    p.add_argument("--noise", type=float, default=tr.Settings.noise)
    p.add_argument("--split", choices=("test", "validation"), default="test")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a round config override (backend.round_config.RoundConfig), repeatable",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("bench/out/active"))
    a = p.parse_args(argv)
    if a.candidates < 2:
        p.error("--candidates must be >= 2")

    import torch

    torch.set_num_threads(a.threads)
    overrides = []
    for item in a.set:
        key, sep, raw = item.partition("=")
        if not sep:
            p.error(f"--set takes FIELD=VALUE, got {item!r}")
        overrides.append((key.strip(), tr._parse_value(raw)))
    seeds, votes, units = a.seeds, a.votes, a.units
    if a.quick:
        seeds, votes, units = 1, 32, 24
        if not any(k == "fidelity_units" for k, _ in overrides):
            overrides.append(("fidelity_units", 16))
    s = tr.Settings(
        tastes=(a.taste,),
        noise=a.noise,
        seeds=seeds,
        votes=votes,
        units=units,
        split=a.split,
        overrides=tuple(overrides),
        quick=a.quick,
    )
    o = Options(taste=a.taste, candidates=a.candidates, rounds=s)

    from backend.round_config import resolve_config
    from bench.alignment import checkpoint_fingerprint
    from worker.shapes import model as shapes_model
    from worker.shapes.model import load_builtin
    from worker.shapes.tastes import get_taste

    get_taste(a.taste)
    resolve_config(dict(s.overrides), "builtin:shapes")  # a bad override fails here, clearly
    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    fp = checkpoint_fingerprint(Path(shapes_model.__file__).parent / "checkpoint")
    base = load_builtin(None)
    u = tr.eval_units(s)
    key = tr._hash({"fp": fp, "u": u, "n": s.num_inference_steps})
    print(
        f"active vs uniform: taste {a.taste}, {s.votes} votes per round, {a.candidates} "
        f"candidates per active pair, {s.seeds} seed(s), {len(u[0])} {s.split} units",
        flush=True,
    )
    t0 = time.perf_counter()
    parent_images = tr._cached(out / f"units-{key}.npz", lambda: tr._sample(base, *u, s))
    rows = []
    for seed in range(s.seeds):
        row = run_seed(seed, o, out, fp, parent_images, u)
        rows.append(row)
        print(
            f"  seed {seed}: taste Δ uniform {row['uniform']['taste_gain']:+.4f}, active "
            f"{row['active']['taste_gain']:+.4f} ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    print()
    print(format_table(rows, a.taste))
    print(f"\n{time.perf_counter() - t0:.0f} s")
    name = f"active-{a.taste}-{tr._hash(asdict(s) | {'c': a.candidates})}.json"
    (out / name).write_text(
        json.dumps(
            {"settings": asdict(s), "candidates": a.candidates, "rows": rows},
            indent=1,
            default=str,
        )
    )
    print(f"wrote {out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
