"""Does one default round make the built-in model better for its annotators? (issue 8, item 4)

    python -m bench.taste_rounds --quick                       # 1 taste x 1 seed, small (~2 min)
    python -m bench.taste_rounds                               # 3 tastes x 3 seeds, test split
    python -m bench.taste_rounds --split validation --set learning_rate=3e-4 --set drift_budget=0.2

Each cell is exactly what the product does with one round on ``--votes`` votes:

1. **Votes.** ``--votes`` pairs of two base-model images of one training-split prompt (the
   product's pool: within-version pairs, fresh seeds), voted on by simulated annotators whose
   utility is ``fidelity:1,<taste>:<weight>`` (:mod:`worker.shapes.tastes`) with 10% label
   noise. Utility ties are votes too, and (as in the product) not trained on.
2. **The round.** The built-in family's default round config
   (``backend.round_config.resolve_config({}, "builtin:shapes")``, plus ``--set`` overrides),
   mapped to the trainer by the product's one mapping; the held-out split by prompt, the epoch
   cap, held-out evaluation, best checkpoint, early stopping and the drift budget all as in
   ``worker.rounds``; the round's candidate rule (``worker.rounds.candidate_verdict``).
3. **Blind A/B against the parent.** ``--units`` evaluation units (prompt, seed) of the chosen
   split (``test``: the world's held-out prompts, never used for tuning; ``validation``:
   training-split prompts kept out of the votes), each sampled from the parent and from the
   candidate with the same seed. The same annotators vote on each (noise included); ties count
   half. The win rate gets a 95% Wilson interval. The judge's change is paired on the units,
   with a normal 95% interval.

The goal (issue 8): win rate >= 0.70 with its interval above 0.5, and a judge drop of at most
0.02. The table says, per cell, whether it is met. Images are cached under ``--out``
(``.npz``, keyed by everything that makes them); nothing else is.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_TASTES = ("brightness", "size", "centred")
GOAL_WIN_RATE = 0.70
GOAL_MAX_JUDGE_DROP = 0.02


@dataclass(frozen=True)
class Settings:
    tastes: tuple[str, ...] = DEFAULT_TASTES
    taste_weight: float = 1.0
    fidelity_weight: float = 1.0
    noise: float = 0.1
    seeds: int = 3
    votes: int = 500
    units: int = 192
    split: str = "test"
    overrides: tuple[tuple[str, Any], ...] = ()
    num_inference_steps: int = 10
    sample_batch: int = 64
    quick: bool = False

    def mix_spec(self, taste: str) -> str:
        if taste == "fidelity":
            return f"fidelity:{self.fidelity_weight:g}"
        return f"fidelity:{self.fidelity_weight:g},{taste}:{self.taste_weight:g}"


@dataclass
class Cell:
    taste: str
    seed: int
    mix: str
    votes: int
    ties: int
    pairs: int
    heldout_pairs: int
    steps: int
    best_step: int
    stop_reason: str | None
    candidate: bool
    no_candidate_reason: str | None
    heldout_acc: float
    drift: float
    probe_delta: float | None
    ab_wins: float
    ab_losses: float
    ab_ties: float
    win_rate: float
    win_lo: float
    win_hi: float
    utility_gain: float
    taste_gain: float
    judge_parent: float
    judge_delta: float
    judge_lo: float
    judge_hi: float
    seconds: float
    heldout: list[dict[str, Any]] = field(default_factory=list)
    #: 95% interval of ``taste_gain`` over the units (paired, normal).
    taste_lo: float = float("nan")
    taste_hi: float = float("nan")

    @property
    def meets_goal(self) -> bool:
        return (
            self.candidate
            and self.win_rate >= GOAL_WIN_RATE
            and self.win_lo > 0.5
            and self.judge_delta >= -GOAL_MAX_JUDGE_DROP
        )


# ---------------------------------------------------------------------------- helpers
def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _parse_value(raw: str) -> Any:
    low = raw.strip().lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(raw)
    except ValueError:
        pass
    try:
        return float(raw)
    except ValueError:
        return raw


def prompt_splits(seed: int = 0) -> tuple[list[str], list[str], list[str]]:
    """``(vote prompts, validation prompts, test prompts)``: the world's training split minus a
    fixed quarter kept for validation, and its held-out prompts (as bench.alignment)."""
    from worker.shapes import world

    train, held = world.split_prompts(seed)
    order = np.random.default_rng([seed, 7]).permutation(len(train))
    n_val = len(train) // 4
    val = [train[i] for i in order[:n_val]]
    votes = [train[i] for i in order[n_val:]]
    test = [held[i] for i in np.random.default_rng([seed, 11]).permutation(len(held))]
    return votes, val, test


def _sample(backbone: Any, prompts: list[str], seeds: list[int], s: Settings) -> np.ndarray:
    from worker.alignment.sampling import sample

    out = sample(
        backbone,
        prompts,
        seeds,
        num_inference_steps=s.num_inference_steps,
        batch_size=s.sample_batch,
    )
    return np.stack([g.image for g in out])


def _cached(path: Path, make: Any) -> np.ndarray:
    if path.is_file():
        return np.load(path)["images"]
    images = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")  # parallel runs: own tmp
    np.savez_compressed(tmp, images=images)
    tmp.replace(path)
    return images


def vote_images(base: Any, seed: int, s: Settings, out: Path, fp: str) -> tuple[list[str], Any]:
    """The pool's pairs for data seed ``seed``: prompts and ``[votes, 2, H, W, 3]`` images."""
    prompts_pool, _, _ = prompt_splits()
    rng = np.random.default_rng([seed, 101])
    prompts = [prompts_pool[i] for i in rng.integers(0, len(prompts_pool), s.votes)]
    seeds = [int(x) for x in rng.integers(0, 2**31 - 1, 2 * s.votes)]
    key = _hash({"fp": fp, "p": prompts, "s": seeds, "n": s.num_inference_steps})
    images = _cached(
        out / f"votes-{key}.npz",
        lambda: _sample(base, [p for p in prompts for _ in range(2)], seeds, s),
    )
    return prompts, images.reshape(s.votes, 2, *images.shape[1:])


def eval_units(s: Settings) -> tuple[list[str], list[int]]:
    _, val, test = prompt_splits()
    pool = test if s.split == "test" else val
    prompts, seeds = [], []
    for j in range(math.ceil(s.units / len(pool))):
        for i, p in enumerate(pool):
            prompts.append(p)
            seeds.append(2_000_000 + 1000 * i + j)
    return prompts[: s.units], seeds[: s.units]


def paired_interval(d: np.ndarray) -> tuple[float, float, float]:
    mean = float(d.mean())
    half = 1.96 * float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 0.0
    return mean, mean - half, mean + half


def run_cell(
    base_ckpt: Path | None,
    taste: str,
    seed: int,
    s: Settings,
    out: Path,
    fp: str,
    parent_images: np.ndarray,
    units: tuple[list[str], list[int]],
    votes: tuple[list[str], np.ndarray] | None = None,
    tag: str = "",
) -> Cell:
    """One round of the product on ``s.votes`` votes of the mix; A/B and judge on the units.
    ``votes``: the pairs to vote on, ``(prompts, [n, 2, H, W, 3] images)`` (default: the
    pool's uniform pairs, :func:`vote_images`); ``tag`` names the run directory apart."""
    from backend.ab_test import wilson_interval
    from backend.round_config import epoch_capped_steps, resolve_config, train_config_kwargs
    from worker.alignment.config import TrainConfig
    from worker.alignment.data import PreferencePair, split_by_prompt
    from worker.alignment.trainer import train
    from worker.rounds import candidate_verdict, fidelity_probe_for
    from worker.shapes.judge import judge_batch
    from worker.shapes.model import load_builtin
    from worker.shapes.tastes import TasteMix, get_taste

    started = time.perf_counter()
    mix = TasteMix.parse(s.mix_spec(taste), noise=s.noise)
    base = load_builtin(base_ckpt)
    prompts, images = votes if votes is not None else vote_images(base, seed, s, out, fp)
    rng = np.random.default_rng([seed, 202, len(taste)])
    pairs, ties = [], 0
    for p, (a, b) in zip(prompts, images, strict=True):
        v = mix.prefer(a, b, p, rng)
        if v == "tie":
            ties += 1
            pairs.append(PreferencePair(p, a, b, tie=True))
        else:
            pairs.append(PreferencePair(p, a, b) if v == "a" else PreferencePair(p, b, a))

    rc = resolve_config(dict(s.overrides), "builtin:shapes")
    rc = rc.model_copy(update={"seed": seed})
    train_pairs, held = split_by_prompt(pairs, rc.holdout_fraction, seed=rc.seed)
    held = [p for p in held if not p.tie]
    trainable = sum(1 for p in train_pairs if not p.tie)
    steps = epoch_capped_steps(rc.steps, trainable, rc.batch_size, rc.grad_accum, rc.max_epochs)
    cfg = TrainConfig(**train_config_kwargs(rc, steps=steps))
    cfg = cfg.replace(lr_warmup_steps=min(cfg.lr_warmup_steps, steps), checkpoint_every=0)
    result = train(
        base,
        train_pairs,
        cfg,
        output_dir=out / "runs" / f"{taste}-{seed}{tag}-{_hash(asdict(s))}",
        resume=False,
        progress_bar=False,
        heldout=held,
        fidelity_probe=fidelity_probe_for("builtin:shapes", rc, held),
    )
    verdict = candidate_verdict(result, len(held), rc.min_heldout_gain)

    u_prompts, u_seeds = units
    cand = _sample(base, u_prompts, u_seeds, s)  # the best weights are in the backbone
    vote_rng = np.random.default_rng([seed, 303, len(taste)])
    w = lo = ti = 0.0
    for p, c, par in zip(u_prompts, cand, parent_images, strict=True):
        v = mix.prefer(c, par, p, vote_rng)
        w += v == "a"
        lo += v == "b"
        ti += v == "tie"
    n = len(u_prompts)
    rate = (w + 0.5 * ti) / n
    wlo, whi = wilson_interval(w + 0.5 * ti, n)
    u_gain = float(
        (mix.utilities(cand, u_prompts) - mix.utilities(parent_images, u_prompts)).mean()
    )
    t = get_taste(taste)
    t_gain, t_lo, t_hi = paired_interval(
        np.array(
            [t(c, p) - t(par, p) for c, par, p in zip(cand, parent_images, u_prompts, strict=True)]
        )
    )
    jp = judge_batch(parent_images, u_prompts)
    jc = judge_batch(cand, u_prompts)
    jd, jlo, jhi = paired_interval(jc - jp)
    best = result.best_eval
    return Cell(
        taste=taste,
        seed=seed,
        mix=str(mix),
        votes=s.votes,
        ties=ties,
        pairs=trainable,
        heldout_pairs=len(held),
        steps=result.steps,
        best_step=result.best_step,
        stop_reason=result.stop_reason,
        candidate=verdict is None,
        no_candidate_reason=verdict,
        heldout_acc=best.accuracy if best else float("nan"),
        drift=best.drift if best else float("nan"),
        probe_delta=best.fidelity if best else None,
        ab_wins=w,
        ab_losses=lo,
        ab_ties=ti,
        win_rate=rate,
        win_lo=wlo,
        win_hi=whi,
        utility_gain=u_gain,
        taste_gain=t_gain,
        judge_parent=float(jp.mean()),
        judge_delta=jd,
        judge_lo=jlo,
        judge_hi=jhi,
        seconds=time.perf_counter() - started,
        heldout=[e.as_dict() for e in result.evals],
        taste_lo=t_lo,
        taste_hi=t_hi,
    )


def _curve(evals: list[dict[str, Any]]) -> str:
    def one(e: dict[str, Any]) -> str:
        probe = "" if e.get("fidelity") is None else f" / {e['fidelity']:+.3f}"
        return f"{e['step']}: {e['accuracy']:.2f} / {e['drift']:.3f}{probe}"

    return ", ".join(one(e) for e in evals)


def format_table(cells: list[Cell]) -> str:
    head = (
        f"{'taste':<11}{'seed':>5}{'steps':>7}{'best':>6}{'h/o acc':>9}{'drift':>8}{'probe':>8}"
        f"{'A/B win [95% CI]':>22}{'judge Δ [95% CI]':>28}{'taste Δ':>10}{'goal':>6}{'s':>6}"
    )
    lines = [head, "-" * len(head)]
    for c in cells:
        ab = f"{c.win_rate:.2f} [{c.win_lo:.2f}, {c.win_hi:.2f}]"
        jd = f"{c.judge_delta:+.3f} [{c.judge_lo:+.3f}, {c.judge_hi:+.3f}]"
        probe = "-" if c.probe_delta is None else f"{c.probe_delta:+.3f}"
        cand = "yes" if c.meets_goal else ("no" if c.candidate else "none")
        lines.append(
            f"{c.taste:<11}{c.seed:>5}{c.steps:>7}{c.best_step:>6}{c.heldout_acc:>9.3f}"
            f"{c.drift:>8.3f}{probe:>8}{ab:>22}{jd:>28}{c.taste_gain:>+10.4f}{cand:>6}{c.seconds:>6.0f}"
        )
    by_taste: dict[str, list[Cell]] = {}
    for c in cells:
        by_taste.setdefault(c.taste, []).append(c)
    lines.append("-" * len(head))
    for taste, cs in by_taste.items():
        met = sum(c.meets_goal for c in cs)
        lines.append(
            f"{taste:<11} mean A/B win {np.mean([c.win_rate for c in cs]):.3f}, judge Δ "
            f"{np.mean([c.judge_delta for c in cs]):+.4f}, goal met {met}/{len(cs)}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="1 taste x 1 seed, 96 votes, 32 units")
    p.add_argument("--tastes", default=",".join(DEFAULT_TASTES))
    p.add_argument("--taste-weight", type=float, default=Settings.taste_weight)
    p.add_argument("--seeds", type=int, default=Settings.seeds)
    p.add_argument("--votes", type=int, default=Settings.votes)
    p.add_argument("--units", type=int, default=Settings.units)
    p.add_argument("--noise", type=float, default=Settings.noise)
    p.add_argument("--split", choices=("test", "validation"), default="test")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a round config override (backend.round_config.RoundConfig), repeatable",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--prepare",
        action="store_true",
        help="only sample (and cache) the parent's units and every seed's vote images, so that "
        "one process per taste can then run in parallel without sampling them again",
    )
    p.add_argument("--out", type=Path, default=Path("bench/out/taste_rounds"))
    a = p.parse_args(argv)

    import torch

    torch.set_num_threads(a.threads)
    overrides = []
    for item in a.set:
        key, sep, raw = item.partition("=")
        if not sep:
            p.error(f"--set takes FIELD=VALUE, got {item!r}")
        overrides.append((key.strip(), _parse_value(raw)))
    s = Settings(
        tastes=tuple(t.strip() for t in a.tastes.split(",") if t.strip()),
        taste_weight=a.taste_weight,
        noise=a.noise,
        seeds=a.seeds,
        votes=a.votes,
        units=a.units,
        split=a.split,
        overrides=tuple(overrides),
        quick=a.quick,
    )
    if a.quick:
        s = Settings(
            tastes=s.tastes[:1],
            taste_weight=s.taste_weight,
            noise=s.noise,
            seeds=1,
            votes=96,
            units=32,
            split=s.split,
            overrides=s.overrides,
            quick=True,
        )
    from backend.round_config import resolve_config
    from worker.shapes.model import load_builtin
    from worker.shapes.tastes import get_taste

    for t in s.tastes:
        get_taste(t)
    resolve_config(dict(s.overrides), "builtin:shapes")  # a bad override fails here, clearly
    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    from bench.alignment import checkpoint_fingerprint
    from worker.shapes import model as shapes_model

    ckpt = None  # the shipped checkpoint
    fp = checkpoint_fingerprint(Path(shapes_model.__file__).parent / "checkpoint")
    base = load_builtin(ckpt)
    units = eval_units(s)
    key = _hash({"fp": fp, "u": units, "n": s.num_inference_steps})
    print(f"taste rounds: {s.split} split, {len(units[0])} units, {s.votes} votes per round")
    parent_images = _cached(out / f"units-{key}.npz", lambda: _sample(base, *units, s))
    if a.prepare:
        for seed in range(s.seeds):
            vote_images(base, seed, s, out, fp)
        print(f"prepared: the parent's units and the votes' images of {s.seeds} seeds")
        return 0
    cells = []
    t0 = time.perf_counter()
    for taste in s.tastes:
        for seed in range(s.seeds):
            c = run_cell(ckpt, taste, seed, s, out, fp, parent_images, units)
            cells.append(c)
            print(
                f"  {taste} seed {seed}: A/B {c.win_rate:.3f} [{c.win_lo:.3f}, {c.win_hi:.3f}], "
                f"judge {c.judge_delta:+.4f}, steps {c.steps} (best {c.best_step}), "
                f"{c.seconds:.0f} s{'' if c.candidate else ' — no candidate'}",
                flush=True,
            )
            print("    held-out curve (step: acc / drift / probe):", _curve(c.heldout), flush=True)
            if c.stop_reason:
                print(f"    stopped: {c.stop_reason}", flush=True)
    print()
    print(format_table(cells))
    rc = resolve_config(dict(s.overrides), "builtin:shapes")
    print(
        f"\nround config: lr {rc.learning_rate:g}, beta {rc.beta:g}, steps {rc.steps}, batch "
        f"{rc.batch_size}, drift_budget {rc.drift_budget}, fidelity_budget "
        f"{rc.fidelity_budget} on {rc.fidelity_units} units, max_epochs {rc.max_epochs}, patience "
        f"{rc.early_stopping_patience}, eval_every {rc.eval_every}; {time.perf_counter() - t0:.0f} s"
    )
    name = f"taste_rounds-{s.split}-{_hash(asdict(s))}.json"
    (out / name).write_text(
        json.dumps(
            {
                "settings": asdict(s),
                "cells": [asdict(c) | {"meets_goal": c.meets_goal} for c in cells],
            },
            indent=1,
            default=str,
        )
    )
    print(f"wrote {out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
