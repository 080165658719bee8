"""Alignment benchmark on the built-in world: DDE against Diffusion-DPO, same data, same compute.

    python -m bench.alignment                      # the full benchmark (3 training seeds)
    python -m bench.alignment --quick              # the same table in under 2 minutes (indicative)
    python -m bench.alignment --seeds 3 --steps 100 --pairs 512 --label-noise 0.1 \\
        --schemes dde,uniform,dde-stepwise,dde-single-shot --out bench/out

What it does (docs/alignment-benchmark.md has the method, the settings and the measured table):

1. **Data.** Two images per *training-split* prompt (``worker.shapes.world.split_prompts``) from
   the BASE model (``worker.alignment.sampling.sample``, explicit seeds), labelled by the judge
   (``worker.shapes.judge.prefer``) with label noise (each decisive vote flipped with that
   probability); judge ties are dropped. The dataset is cached under ``--out`` keyed by a hash of
   everything that makes it (the checkpoint's bytes included), and every scheme and every
   training seed trains on the same pairs.
2. **Training.** Each credit scheme (``dde``, ``uniform`` = Diffusion-DPO, and the ablations
   ``dde-stepwise`` / ``dde-single-shot``) is trained with ``worker.alignment.trainer.train`` (LoRA
   on the built-in model), with the same steps, batch, learning rate, β, rank and training seeds.
   Training seed ``s`` gives every scheme the same data order and the same LoRA initialisation.
3. **Evaluation.** The judge scores images sampled from HELD-OUT prompts with FIXED sampling
   seeds: the same (prompt, seed) units for the base and for every trained model. Models are
   evaluated at several steps during training (through the trainer's progress callback, which
   draws nothing from the training's random streams), for the score-vs-step curve.
4. **Statistics.** Means with 95% percentile-bootstrap intervals, hierarchical: each replicate
   resamples the training seeds, then the evaluation units (one resample of units shared by all
   seeds of the replicate, since every seed is scored on the same units). Gains and win rates are
   paired against the base on the same (prompt, seed); the scheme-vs-scheme comparison is paired
   on the same training seed and unit.

Results: a table on stdout, ``alignment.json`` (every figure, per-unit scores included) and
``alignment_curve.png`` under ``--out``. Only this file's helpers are imported by its tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SCHEMES: tuple[str, ...] = ("dde", "uniform", "dde-stepwise", "dde-single-shot")
SCHEME_LABELS: dict[str, str] = {
    "dde": "DDE",
    "uniform": "Diffusion-DPO",
    "dde-stepwise": "DDE stepwise-only",
    "dde-single-shot": "DDE single-shot-only",
}
BASELINE = "uniform"
CURVE_MARKERS: dict[str, str] = {
    "dde": "D",
    "uniform": "U",
    "dde-stepwise": "s",
    "dde-single-shot": "o",
}
CACHE_VERSION = 2  # 2: D in ε units for the v-prediction built-in model


# ============================================================================ settings
@dataclass(frozen=True)
class BenchSettings:
    """Everything a benchmark run depends on. The defaults are the full benchmark's.

    Attributes (the training hyperparameters are the same for every scheme):
        schemes: credit schemes to train.
        seeds: training seeds per scheme (0 .. seeds-1).
        steps: optimizer steps per run.
        batch_size: preference pairs per step.
        learning_rate: AdamW learning rate of the LoRA weights (constant after warm-up).
        lr_warmup_steps: linear warm-up.
        beta: β, in Diffusion-DPO's reference convention (loss = -log σ(-0.5 β ...)).
        lora_rank: LoRA rank (alpha = rank).
        rounds: online rounds, the product's loop. The ``steps`` are split evenly over the
            rounds; round 1 trains on the base model's pairs (``pairs`` of them), and before each
            later round the LoRA trained so far is fused into the weights, ``pairs`` fresh pairs
            are sampled from that *current* model and labelled by the judge, and a fresh LoRA is
            trained on top of it with it as the reference (exactly what a production round does
            on its parent version). 1: offline, one set of pairs from the base. Online runs use
            ``rounds`` times the labels of an offline one.
        winner_anchor: DPO-Positive's λ (``TrainConfig.winner_anchor``), the same for every
            scheme; 0 is plain Diffusion-DPO / DDE.
        pairs: decisive (non-tie) preference pairs to train on.
        candidates: images sampled per pair prompt; the pair is the judge's best and worst of
            them (2: an ordinary pair, the default). More candidates give pairs with a wider
            judge gap from the same base model ("best vs worst of N", as in on-policy RLHF data).
        label_noise: probability that a decisive judge vote is flipped.
        eval_prompts: held-out prompts to evaluate on.
        eval_seeds: sampling seeds per evaluation prompt (units = prompts x seeds).
        eval_split: ``"test"`` (held-out prompts of the world's split, the reported figures) or
            ``"validation"`` (training-split prompts reserved from the pair data, for tuning).
        validation_prompts: training-split prompts reserved for the validation split.
        curve_points: evaluations per run, evenly spaced; the last is at ``steps``.
        curve_units: the intermediate evaluations judge only the first this many units (the
            final one judges them all); the curve is drawn on these units at every step.
        num_inference_steps, guidance_scale: sampling settings of the data and of the evaluation
            (None: the checkpoint's defaults, 25 DDIM steps and guidance 1). 10 DDIM steps by
            default: 2.5x cheaper than 25, see docs/alignment-benchmark.md.
        data_seed: seed of the data's prompt choice, image seeds and label noise.
        split_seed: seed of ``world.split_prompts``.
        bootstrap: bootstrap replicates.
        checkpoint: base checkpoint folder (None: the shipped one).
        sample_batch: images per sampling batch.
        quick: quick mode (fewer of everything; figures indicative only).
    """

    schemes: tuple[str, ...] = SCHEMES
    seeds: int = 3
    steps: int = 100
    batch_size: int = 32
    learning_rate: float = 1e-3
    lr_warmup_steps: int = 0
    beta: float = 20000.0
    lora_rank: int = 8
    rounds: int = 1
    winner_anchor: float = 0.0
    pairs: int = 512
    candidates: int = 2
    label_noise: float = 0.1
    eval_prompts: int = 128
    eval_seeds: int = 2
    eval_split: str = "test"
    validation_prompts: int = 96
    curve_points: int = 3
    curve_units: int = 32
    num_inference_steps: int | None = 10
    guidance_scale: float | None = None
    data_seed: int = 0
    split_seed: int = 0
    bootstrap: int = 4000
    checkpoint: str | None = None
    sample_batch: int = 48
    quick: bool = False

    def __post_init__(self) -> None:
        if not self.schemes:
            raise ValueError("at least one scheme is needed")
        for name in (
            "seeds",
            "steps",
            "batch_size",
            "lora_rank",
            "rounds",
            "pairs",
            "eval_prompts",
            "eval_seeds",
            "curve_points",
            "curve_units",
            "bootstrap",
            "sample_batch",
        ):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.rounds > self.steps:
            raise ValueError(f"rounds ({self.rounds}) must not exceed steps ({self.steps})")
        if self.candidates < 2:
            raise ValueError(f"candidates must be >= 2, got {self.candidates}")
        if not 0.0 <= self.label_noise < 0.5:
            raise ValueError(f"label_noise must be in [0, 0.5), got {self.label_noise}")
        if self.eval_split not in ("test", "validation"):
            raise ValueError(f"eval_split must be 'test' or 'validation', got {self.eval_split!r}")
        if self.beta <= 0 or self.learning_rate <= 0:
            raise ValueError("beta and learning_rate must be > 0")
        if self.winner_anchor < 0:
            raise ValueError(f"winner_anchor must be >= 0, got {self.winner_anchor}")

    def replace(self, **changes: Any) -> BenchSettings:
        return dataclasses.replace(self, **changes)


QUICK = dict(
    seeds=1,
    steps=12,
    batch_size=8,
    pairs=24,
    eval_prompts=16,
    eval_seeds=1,
    curve_points=2,
    curve_units=8,
    bootstrap=1000,
    quick=True,
)
"""Overrides of ``--quick``: under 2 minutes on a 2-core CPU; the figures are indicative only."""


# ============================================================================ statistics
def win_indicator(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """1 where ``a > b``, 0.5 where ``a == b`` (a tie counts half), 0 where ``a < b``."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return (a > b).astype(np.float64) + 0.5 * (a == b)


def win_rate(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of paired units where ``a`` beats ``b``, ties counting half."""
    return float(win_indicator(a, b).mean())


@dataclass(frozen=True)
class Estimate:
    """A mean and its bootstrap interval."""

    mean: float
    lo: float
    hi: float

    def as_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "lo": self.lo, "hi": self.hi}

    def fmt(self, digits: int = 3, signed: bool = False) -> str:
        f = f"{{:+.{digits}f}}" if signed else f"{{:.{digits}f}}"
        return f"{f.format(self.mean)} [{f.format(self.lo)}, {f.format(self.hi)}]"


def bootstrap_mean(
    values: np.ndarray,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> Estimate:
    """Mean of ``values`` with a hierarchical percentile-bootstrap interval.

    ``values`` is ``[S, U]``: one row per training seed, one column per evaluation unit (a 1-D
    array is one seed). Each replicate draws S seeds with replacement, then U units with
    replacement (one draw of units for all the replicate's seeds: the units are crossed with the
    seeds), and takes the mean over the drawn cells. The interval is the replicates'
    ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles.

    For a paired quantity, pass the per-cell difference (``a - b`` or :func:`win_indicator`).
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.size == 0:
        raise ValueError(f"expected a non-empty [seeds, units] array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("values must be finite")
    s, u = x.shape
    rng = np.random.default_rng(seed)
    est = np.empty(n_boot, dtype=np.float64)
    chunk = max(1, 2_000_000 // max(1, s * u))
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        seed_counts = np.zeros((b, s))
        unit_counts = np.zeros((b, u))
        rows = np.arange(b)[:, None]
        np.add.at(seed_counts, (rows, rng.integers(0, s, (b, s))), 1.0)
        np.add.at(unit_counts, (rows, rng.integers(0, u, (b, u))), 1.0)
        est[start : start + b] = np.einsum("bs,su,bu->b", seed_counts, x, unit_counts) / (s * u)
    lo, hi = np.quantile(est, [(1 - level) / 2, (1 + level) / 2])
    return Estimate(float(x.mean()), float(lo), float(hi))


def paired_difference(a: np.ndarray, b: np.ndarray, **kwargs: Any) -> Estimate:
    """Mean of ``a - b`` over paired cells ``[S, U]``, with :func:`bootstrap_mean`'s interval."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        a, b = np.broadcast_arrays(a, b)
    return bootstrap_mean(a - b, **kwargs)


def curve_steps(steps: int, points: int) -> list[int]:
    """``points`` evaluation steps spread evenly over ``1..steps``, the last at ``steps``."""
    points = max(1, min(points, steps))
    return sorted({max(1, round(steps * i / points)) for i in range(1, points + 1)})


# ============================================================================ helpers
def _mute(message: str) -> None:
    """A log that drops its message."""


def _quiet() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    except Exception:  # pragma: no cover - optional
        pass
    import logging

    for name in ("accelerate", "worker.alignment.trainer", "diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def checkpoint_dir(settings: BenchSettings) -> Path:
    from worker.shapes.model import DEFAULT_CHECKPOINT

    return Path(settings.checkpoint) if settings.checkpoint else DEFAULT_CHECKPOINT


def checkpoint_fingerprint(path: Path) -> str:
    """SHA-256 over every file of a checkpoint folder (names and bytes)."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != "README.md")
    if not files:
        raise FileNotFoundError(f"no checkpoint files under {path}")
    for f in files:
        h.update(str(f.relative_to(path)).encode() + b"\x00")
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def snapshot_checkpoint(path: Path, out: Path, attempts: int = 5) -> tuple[Path, str]:
    """A private copy of the checkpoint under ``out``, and its fingerprint.

    Every run of the benchmark loads the base model from this copy, so a checkpoint that is
    rewritten while the benchmark runs (``save_builtin`` replaces the folder) cannot mix two base
    models into one table.
    """
    import shutil
    import tempfile

    out.mkdir(parents=True, exist_ok=True)
    for _ in range(attempts):
        tmp: Path | None = None
        try:
            fingerprint = checkpoint_fingerprint(path)
            dest = out / f"checkpoint-{fingerprint[:16]}"
            if dest.is_dir() and checkpoint_fingerprint(dest) == fingerprint:
                return dest, fingerprint
            # a private temporary name: two benchmarks started together on one --out must not
            # copy into the same folder
            tmp = Path(tempfile.mkdtemp(dir=out, prefix=f".checkpoint-{fingerprint[:16]}-"))
            shutil.copytree(path, tmp, dirs_exist_ok=True)
            if checkpoint_fingerprint(tmp) != fingerprint:
                raise FileNotFoundError("the checkpoint changed while it was copied")
            if dest.is_dir() and checkpoint_fingerprint(dest) != fingerprint:
                shutil.rmtree(dest, ignore_errors=True)  # a stale or half-written copy
            try:
                os.rename(tmp, dest)  # atomic; fails if another process got there first
            except OSError:
                if not (dest.is_dir() and checkpoint_fingerprint(dest) == fingerprint):
                    raise
            return dest, fingerprint
        except FileNotFoundError:
            time.sleep(2.0)
        finally:
            if tmp is not None and tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    raise RuntimeError(f"could not take a stable copy of the checkpoint at {path}")


def load_base(settings: BenchSettings) -> Any:
    from worker.shapes.model import load_builtin

    return load_builtin(checkpoint_dir(settings))


def prompt_sets(settings: BenchSettings) -> tuple[list[str], list[str], list[str]]:
    """``(pair prompts, validation prompts, test prompts)``, disjoint.

    The world's split gives training and held-out prompts. ``validation_prompts`` training-split
    prompts are set aside for tuning and never used for pairs; the test prompts are the first
    ``eval_prompts`` of a fixed permutation of the held-out ones.
    """
    from worker.shapes import world

    train, held = world.split_prompts(settings.split_seed)
    rng = np.random.default_rng([settings.split_seed, 7])
    order = rng.permutation(len(train))
    n_val = min(settings.validation_prompts, len(train) // 4)
    val = [train[i] for i in order[:n_val]]
    pair_pool = [train[i] for i in order[n_val:]]
    test_order = np.random.default_rng([settings.split_seed, 11]).permutation(len(held))
    test = [held[i] for i in test_order]
    return pair_pool, val, test


def eval_units(settings: BenchSettings) -> tuple[list[str], list[int]]:
    """The evaluation units: ``eval_prompts`` prompts x ``eval_seeds`` fixed sampling seeds.

    Returns ``(prompts, seeds)``, one entry per unit, ordered seed-major (every prompt with its
    first seed, then every prompt with its second, ...). Unit (prompt i, j-th seed) is sampled
    with seed ``1_000_000 + 1000 i + j`` by the base and by every trained model alike.
    """
    _, val, test = prompt_sets(settings)
    pool = test if settings.eval_split == "test" else val
    prompts = pool[: min(settings.eval_prompts, len(pool))]
    units_p, units_s = [], []
    for j in range(settings.eval_seeds):  # seed-major: a prefix of the units spans many prompts
        for i, p in enumerate(prompts):
            units_p.append(p)
            units_s.append(1_000_000 + 1000 * i + j)
    return units_p, units_s


def sample_and_judge(
    backbone: Any, prompts: Sequence[str], seeds: Sequence[int], settings: BenchSettings
) -> tuple[np.ndarray, np.ndarray]:
    """``(images [N, H, W, 3] uint8, judge scores [N])`` of ``backbone``'s samples."""
    from worker.alignment.sampling import sample
    from worker.shapes.judge import judge_batch

    gen = sample(
        backbone,
        list(prompts),
        list(seeds),
        guidance_scale=settings.guidance_scale,
        num_inference_steps=settings.num_inference_steps,
        batch_size=settings.sample_batch,
    )
    images = np.stack([g.image for g in gen])
    return images, judge_batch(images, list(prompts))


# ============================================================================ data
@dataclass
class PairData:
    """The preference dataset: decisive pairs, labelled by the (noisy) judge."""

    prompts: list[str]
    winners: np.ndarray  # [N, H, W, 3] uint8
    losers: np.ndarray
    winner_scores: np.ndarray  # judge scores (noise-free) of the labelled winner / loser
    loser_scores: np.ndarray
    flipped: np.ndarray  # bool: the label noise flipped this vote
    stats: dict[str, Any] = field(default_factory=dict)

    def to_pairs(self) -> list[Any]:
        from worker.alignment.trainer import PreferencePair

        return [
            PreferencePair(prompt, winner, loser)
            for prompt, winner, loser in zip(self.prompts, self.winners, self.losers, strict=True)
        ]


def data_key(settings: BenchSettings, fingerprint: str) -> dict[str, Any]:
    return {
        "v": CACHE_VERSION,
        "checkpoint": fingerprint,
        "pairs": settings.pairs,
        **({"candidates": settings.candidates} if settings.candidates != 2 else {}),
        "label_noise": settings.label_noise,
        "data_seed": settings.data_seed,
        "split_seed": settings.split_seed,
        "validation_prompts": settings.validation_prompts,
        "num_inference_steps": settings.num_inference_steps,
        "guidance_scale": settings.guidance_scale,
    }


def sample_pairs(
    settings: BenchSettings,
    backbone: Any,
    stream: Sequence[int],
    seed_base: int,
    log: Callable[[str], None],
) -> PairData:
    """Samples ``settings.pairs`` decisive pairs from ``backbone`` and labels them by the judge.

    Prompts come from the pair pool in an order drawn from ``stream`` (a seed sequence), the
    label noise from another stream of it; candidate ``c`` of the ``j``-th prompt drawn is sampled
    with seed ``seed_base + candidates * j + c``. Each pair is the judge's best and worst of its
    ``candidates`` samples, then voted on by :func:`worker.shapes.judge.prefer` with the label
    noise; judge ties are dropped.
    """
    from worker.shapes.judge import prefer

    started = time.perf_counter()
    pool, _, _ = prompt_sets(settings)
    order = np.random.default_rng([*stream, 1]).permutation(len(pool))
    label_rng = np.random.default_rng([*stream, 2])
    prompts: list[str] = []
    winners: list[np.ndarray] = []
    losers: list[np.ndarray] = []
    ws: list[float] = []
    ls: list[float] = []
    flips: list[bool] = []
    candidates = ties = 0
    cursor = 0
    max_candidates = 4 * settings.pairs
    while len(prompts) < settings.pairs and candidates < max_candidates:
        need = settings.pairs - len(prompts)
        n = min(max_candidates - candidates, max(8, int(need * 1.15) + 2))
        chunk = [pool[order[(cursor + i) % len(pool)]] for i in range(n)]
        k = settings.candidates  # candidate c of prompt i: seed seed_base + k (cursor + i) + c
        seeds = [seed_base + k * (cursor + i) + c for c in range(k) for i in range(n)]
        imgs, scores = sample_and_judge(backbone, chunk * k, seeds, settings)
        imgs, scores = imgs.reshape(k, n, *imgs.shape[1:]), scores.reshape(k, n)
        for i, p in enumerate(chunk):
            candidates += 1
            if len(prompts) >= settings.pairs:
                break
            # best vs worst of the k candidates, in seed order (k = 2: the two samples; equal
            # scores pick one image twice, which the judge calls a tie, as it would the two)
            hi, lo = int(np.argmax(scores[:, i])), int(np.argmin(scores[:, i]))
            first, second = min(hi, lo), max(hi, lo)
            a_img, b_img = imgs[first, i], imgs[second, i]
            a_sc, b_sc = scores[first, i], scores[second, i]
            vote = prefer(a_img, b_img, p, noise=settings.label_noise, rng=label_rng)
            if vote == "tie":
                ties += 1
                continue
            a_wins = vote == "a"
            truth_a = a_sc > b_sc
            prompts.append(p)
            winners.append(a_img if a_wins else b_img)
            losers.append(b_img if a_wins else a_img)
            ws.append(float(a_sc if a_wins else b_sc))
            ls.append(float(b_sc if a_wins else a_sc))
            flips.append(bool(a_wins != truth_a))
        cursor += n
    if not prompts:
        raise RuntimeError(f"no decisive pairs among {candidates} candidates (all judge ties)")
    w_sc, l_sc = np.array(ws), np.array(ls)
    stats = {
        "pairs": len(prompts),
        "candidates": candidates,
        "ties_dropped": ties,
        "flipped": int(np.sum(flips)),
        "distinct_prompts": len(set(prompts)),
        "mean_score_of_sampled_images": round(float(np.mean(np.concatenate([w_sc, l_sc]))), 4),
        "mean_abs_score_gap": round(float(np.mean(np.abs(w_sc - l_sc))), 4),
        "seconds": round(time.perf_counter() - started, 1),
    }
    if len(prompts) < settings.pairs:
        log(f"data: only {len(prompts)} decisive pairs after {candidates} candidates")
    return PairData(
        prompts, np.stack(winners), np.stack(losers), w_sc, l_sc, np.array(flips), stats
    )


def build_pairs(
    settings: BenchSettings, backbone: Any, fingerprint: str, out: Path, log: Callable[[str], None]
) -> PairData:
    """The base model's pairs (:func:`sample_pairs`), or the same from the cache under ``out``."""
    key = data_key(settings, fingerprint)
    path = out / f"pairs-{_hash(key)}.npz"
    if path.is_file():
        z = np.load(path, allow_pickle=False)
        meta = json.loads(str(z["meta"]))
        log(f"data: {len(z['prompts'])} pairs from the cache {path.name}")
        return PairData(
            [str(p) for p in z["prompts"]],
            z["winners"],
            z["losers"],
            z["winner_scores"],
            z["loser_scores"],
            z["flipped"].astype(bool),
            meta["stats"],
        )
    data = sample_pairs(settings, backbone, [settings.data_seed], 0, log)
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(
        tmp,
        prompts=np.array(data.prompts),
        winners=data.winners,
        losers=data.losers,
        winner_scores=data.winner_scores,
        loser_scores=data.loser_scores,
        flipped=data.flipped,
        meta=np.array(json.dumps({"key": key, "stats": data.stats})),
    )
    os.replace(tmp, path)
    log(
        f"data: {data.stats['pairs']} pairs ({data.stats['ties_dropped']} ties dropped, "
        f"{data.stats['flipped']} labels flipped) in {data.stats['seconds']:.0f} s -> {path.name}"
    )
    return data


def eval_key(settings: BenchSettings, fingerprint: str) -> dict[str, Any]:
    return {
        "v": CACHE_VERSION,
        "checkpoint": fingerprint,
        "eval_split": settings.eval_split,
        "eval_prompts": settings.eval_prompts,
        "eval_seeds": settings.eval_seeds,
        "split_seed": settings.split_seed,
        "validation_prompts": settings.validation_prompts,
        "num_inference_steps": settings.num_inference_steps,
        "guidance_scale": settings.guidance_scale,
    }


def base_scores(
    settings: BenchSettings, backbone: Any, fingerprint: str, out: Path, log: Callable[[str], None]
) -> np.ndarray:
    """Judge scores ``[U]`` of the base model on the evaluation units (cached)."""
    key = eval_key(settings, fingerprint)
    path = out / f"base-eval-{_hash(key)}.json"
    if path.is_file():
        return np.array(json.loads(path.read_text())["scores"])
    started = time.perf_counter()
    prompts, seeds = eval_units(settings)
    _, scores = sample_and_judge(backbone, prompts, seeds, settings)
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, "scores": scores.tolist()}))
    log(f"base: judged {len(scores)} units in {time.perf_counter() - started:.0f} s")
    return scores


# ============================================================================ training runs
def train_config(settings: BenchSettings, scheme: str, seed: int) -> Any:
    from worker.alignment.config import TrainConfig

    return TrainConfig(
        scheme=scheme,
        steps=settings.steps,
        batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        lr_warmup_steps=settings.lr_warmup_steps,
        beta=settings.beta,
        lora_rank=settings.lora_rank,
        winner_anchor=settings.winner_anchor,
        seed=seed,
        checkpoint_every=0,
        log_every=1,
        # the product's guards are off: the benchmark reports every run as it ran
        loss_spike_factor=None,
        max_median_loss=None,
    )


def run_key(
    settings: BenchSettings, scheme: str, seed: int, dkey: dict, ekey: dict
) -> dict[str, Any]:
    cfg = train_config(settings, scheme, seed).to_dict()
    return {
        "v": CACHE_VERSION,
        "train": cfg,
        "data": dkey,
        "eval": ekey,
        "curve": [settings.curve_points, settings.curve_units],
        **({"rounds": settings.rounds} if settings.rounds != 1 else {}),
    }


def round_steps(steps: int, rounds: int) -> list[int]:
    """``steps`` split over ``rounds`` as evenly as possible, the longer rounds first."""
    return [steps // rounds + (1 if r < steps % rounds else 0) for r in range(rounds)]


def train_and_evaluate(
    settings: BenchSettings,
    scheme: str,
    seed: int,
    pairs: list[Any],
    units: tuple[list[str], list[int]],
    workdir: Path,
) -> dict[str, Any]:
    """One training run, judged on the evaluation units at each curve step."""
    from worker.alignment.trainer import train

    backbone = load_base(settings)
    checkpoints = set(curve_steps(settings.steps, settings.curve_points))
    curve: dict[int, list[float]] = {}
    eval_seconds = 0.0

    def progress(m: Any) -> None:
        nonlocal eval_seconds
        if m.step in checkpoints:
            t0 = time.perf_counter()
            n = len(units[0]) if m.step == settings.steps else settings.curve_units
            _, scores = sample_and_judge(backbone, units[0][:n], units[1][:n], settings)
            curve[m.step] = scores.tolist()
            eval_seconds += time.perf_counter() - t0

    started = time.perf_counter()
    config = train_config(settings, scheme, seed)
    hist: list[Any] = []
    round_data: list[dict[str, Any]] = []
    done = 0  # steps of the earlier rounds
    for r, n_steps in enumerate(round_steps(settings.steps, settings.rounds)):
        if r > 0:  # online: the current model makes the next round's pairs
            from worker.alignment.adapters import fuse_adapter

            fuse_adapter(backbone.unet)
            data = sample_pairs(settings, backbone, [settings.data_seed, seed, r], 10**7 * r, _mute)
            pairs = data.to_pairs()
            round_data.append({"round": r + 1, **data.stats})
        offset = done
        result = train(
            backbone,
            pairs,
            config.replace(steps=n_steps, seed=seed + 1000 * r),
            output_dir=workdir / f"round-{r + 1}" if settings.rounds > 1 else workdir,
            progress=lambda m, offset=offset: progress(
                dataclasses.replace(m, step=m.step + offset)
            ),
            resume=False,
            progress_bar=False,
        )
        hist += result.history
        done += n_steps
    total = time.perf_counter() - started
    sample_seconds = sum(d["seconds"] for d in round_data)
    tail = hist[-max(1, len(hist) // 5) :]
    return {
        "scheme": scheme,
        "seed": seed,
        "curve": {str(k): v for k, v in sorted(curve.items())},
        "train_seconds": round(total - eval_seconds - sample_seconds, 2),
        "eval_seconds": round(eval_seconds, 2),
        "sample_seconds": round(sample_seconds, 2),
        "implicit_acc_end": float(np.mean([m.implicit_acc for m in tail])),
        "round_data": round_data,
        "loss_end": float(np.mean([m.loss for m in tail])),
        "history": {
            "loss": [round(m.loss, 5) for m in hist],
            "implicit_acc": [round(m.implicit_acc, 4) for m in hist],
            "reward_margin": [round(m.reward_margin, 5) for m in hist],
            "model_mse": [round(m.model_mse, 6) for m in hist],
            "ref_mse": [round(m.ref_mse, 6) for m in hist],
            "grad_norm": [round(m.grad_norm, 5) for m in hist],
        },
    }


def lock_is_stale(lock: Path, grace_seconds: float = 60.0) -> bool:
    """Whether a run's lock file was left by a process that is gone.

    A lock holds the PID of the process training that run. It is stale when that process no
    longer exists; an empty or unreadable lock (its writer died between creating and writing
    it) is stale once older than ``grace_seconds``. A live process's lock is never stale, so a
    second benchmark started on the same ``--out`` does not take the first one's runs.
    """
    try:
        text = lock.read_text().strip()
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    except OSError:
        return True
    if not text.isdigit():
        return age > grace_seconds
    try:
        os.kill(int(text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


def _work(
    settings: BenchSettings,
    jobs: list[tuple[int, str]],
    paths: dict[tuple[int, str], Path],
    pairs: list[Any],
    units: tuple[list[str], list[int]],
    out: Path,
    log: Callable[[str], None],
    base_mean: float,
) -> None:
    """Runs every job that has no result yet and that no other process has claimed."""
    total = len(paths)
    for seed, scheme in jobs:
        cache = paths[(seed, scheme)]
        number = list(paths).index((seed, scheme)) + 1
        if cache.is_file():
            log(f"[{number}/{total}] {scheme} seed {seed}: from the cache")
            continue
        lock = cache.with_suffix(".lock")
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            continue  # another process (of this benchmark, or of one beside it) is on it
        try:
            os.write(fd, str(os.getpid()).encode())
        finally:
            os.close(fd)
        try:
            t0 = time.perf_counter()
            r = train_and_evaluate(
                settings, scheme, seed, pairs, units, out / "work" / f"{scheme}-{seed}"
            )
            tmp = cache.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(r))
            os.replace(tmp, cache)
        finally:
            lock.unlink(missing_ok=True)
        final = np.mean(r["curve"][str(settings.steps)])
        log(
            f"[{number}/{total}] {scheme} seed {seed}: judge {final:.3f} (base {base_mean:.3f}), "
            f"implicit acc {r['implicit_acc_end']:.2f}, train {r['train_seconds']:.0f} s + "
            f"eval {r['eval_seconds']:.0f} s ({time.perf_counter() - t0:.0f} s, pid {os.getpid()})"
        )


def _spawn_helpers(settings: BenchSettings, out: Path, n: int, threads: int | None) -> list[Any]:
    """``n`` helper processes that take training runs off the same job list (``--workers``)."""
    import subprocess

    if n <= 0:
        return []
    spec = out / f".settings-{os.getpid()}.json"
    spec.write_text(json.dumps(asdict(settings)))
    cmd = [sys.executable, "-m", "bench.alignment", "--helper-for", str(spec), "--out", str(out)]
    cmd += ["--threads", str(threads or 1)]
    return [subprocess.Popen(cmd) for _ in range(n)]


def _helper_main(spec: Path, out: Path, threads: int) -> int:
    """A helper process: the same job list as its parent, runs claimed through lock files."""
    _quiet()
    import torch

    torch.set_num_threads(threads)
    raw = json.loads(spec.read_text())
    raw["schemes"] = tuple(raw["schemes"])
    settings = BenchSettings(**raw)
    fingerprint = checkpoint_fingerprint(checkpoint_dir(settings))
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    data = build_pairs(settings, None, fingerprint, out, lambda m: None)
    units = eval_units(settings)
    base = base_scores(settings, None, fingerprint, out, lambda m: None)
    dkey, ekey = data_key(settings, fingerprint), eval_key(settings, fingerprint)
    jobs = [(seed, scheme) for seed in range(settings.seeds) for scheme in settings.schemes]
    jobs = jobs[::-1]  # from the other end of the list than the parent
    runs_dir = out / "runs"
    paths = {
        (seed, scheme): runs_dir
        / f"{scheme}-seed{seed}-{_hash(run_key(settings, scheme, seed, dkey, ekey))}.json"
        for seed, scheme in jobs[::-1]
    }
    _work(settings, jobs, paths, data.to_pairs(), units, out, log, float(base.mean()))
    return 0


# ============================================================================ summary
def summarise(
    settings: BenchSettings,
    base: np.ndarray,
    runs: dict[str, list[dict[str, Any]]],
) -> dict[str, Any]:
    """Table rows, scheme comparisons and curves from the per-unit scores."""
    nb = settings.bootstrap
    final = str(settings.steps)
    rows: list[dict[str, Any]] = [
        {
            "scheme": "base",
            "label": "base model",
            "score": bootstrap_mean(base, n_boot=nb, seed=1).as_dict(),
            "gain": None,
            "win_rate": None,
            "implicit_acc_end": None,
            "seconds_per_run": None,
        }
    ]
    finals: dict[str, np.ndarray] = {}
    curves: dict[str, list[dict[str, Any]]] = {}
    for scheme, rs in runs.items():
        scores = np.array([r["curve"][final] for r in rs])  # [S, U]
        finals[scheme] = scores
        rows.append(
            {
                "scheme": scheme,
                "label": SCHEME_LABELS.get(scheme, scheme),
                "score": bootstrap_mean(scores, n_boot=nb, seed=2).as_dict(),
                "gain": paired_difference(scores, base[None, :], n_boot=nb, seed=3).as_dict(),
                "win_rate": bootstrap_mean(
                    win_indicator(scores, base[None, :]), n_boot=nb, seed=4
                ).as_dict(),
                "implicit_acc_end": float(np.mean([r["implicit_acc_end"] for r in rs])),
                "seconds_per_run": float(np.mean([r["train_seconds"] for r in rs])),
                "per_seed_mean": [float(x) for x in scores.mean(axis=1)],
            }
        )
        cu = min(settings.curve_units, len(base))
        zero = {"mean": 0.0, "lo": 0.0, "hi": 0.0}
        points = [
            {"step": 0, **bootstrap_mean(base[:cu], n_boot=nb, seed=5).as_dict(), "gain": zero}
        ]
        for step in sorted({int(k) for k in rs[0]["curve"]}):
            arr = np.array([r["curve"][str(step)][:cu] for r in rs])
            gain = paired_difference(arr, base[None, :cu], n_boot=nb, seed=8).as_dict()
            points.append(
                {"step": step, **bootstrap_mean(arr, n_boot=nb, seed=5).as_dict(), "gain": gain}
            )
        curves[scheme] = points
    comparisons = []
    if BASELINE in finals:
        for scheme in finals:
            if scheme == BASELINE:
                continue
            d = paired_difference(finals[scheme], finals[BASELINE], n_boot=nb, seed=6)
            comparisons.append(
                {
                    "scheme": scheme,
                    "versus": BASELINE,
                    "difference": d.as_dict(),
                    "head_to_head_win_rate": bootstrap_mean(
                        win_indicator(finals[scheme], finals[BASELINE]), n_boot=nb, seed=7
                    ).as_dict(),
                }
            )
    return {"rows": rows, "comparisons": comparisons, "curves": curves}


def _fmt(e: dict[str, float] | None, signed: bool = False, digits: int = 3) -> str:
    if e is None:
        return "—"
    return Estimate(e["mean"], e["lo"], e["hi"]).fmt(digits, signed)


def format_table(summary: dict[str, Any]) -> str:
    header = [
        "scheme",
        "mean judge score [95% CI]",
        "gain vs base [95% CI]",
        "win rate vs base [95% CI]",
        "implicit acc at end",
        "s/run",
    ]
    lines = []
    for r in summary["rows"]:
        lines.append(
            [
                r["label"] if r["scheme"] in ("base",) else f"{r['label']} ({r['scheme']})",
                _fmt(r["score"]),
                _fmt(r["gain"], signed=True),
                _fmt(r["win_rate"], digits=2),
                "—" if r["implicit_acc_end"] is None else f"{r['implicit_acc_end']:.2f}",
                "—" if r["seconds_per_run"] is None else f"{r['seconds_per_run']:.0f}",
            ]
        )
    widths = [max(len(header[i]), *(len(row[i]) for row in lines)) for i in range(len(header))]
    out = [" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    out.append("-|-".join("-" * w for w in widths))
    out += [" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in lines]
    return "\n".join(out)


def format_comparisons(summary: dict[str, Any], n_seeds: int, n_units: int) -> str:
    out = []
    for c in summary["comparisons"]:
        d = c["difference"]
        verdict = (
            "better" if d["lo"] > 0 else "worse" if d["hi"] < 0 else "no significant difference"
        )
        out.append(
            f"{SCHEME_LABELS.get(c['scheme'], c['scheme'])} vs {SCHEME_LABELS[c['versus']]}: "
            f"mean paired difference {_fmt(d, signed=True)} "
            f"(head-to-head win rate {_fmt(c['head_to_head_win_rate'], digits=2)}; "
            f"{n_seeds} seeds x {n_units} units) -> {verdict}"
        )
    return "\n".join(out)


def ascii_curve(curves: dict[str, list[dict[str, Any]]], height: int = 12, width: int = 56) -> str:
    """A small text plot of mean judge score against training step, one marker per scheme."""
    if not curves:
        return ""
    all_steps = sorted({p["step"] for pts in curves.values() for p in pts})
    ys = [p["mean"] for pts in curves.values() for p in pts]
    lo, hi = min(ys), max(ys)
    if hi - lo < 1e-6:
        lo, hi = lo - 0.005, hi + 0.005
    pad = 0.05 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    max_step = max(all_steps) or 1
    grid = [[" "] * width for _ in range(height)]
    for scheme, pts in curves.items():
        mark = CURVE_MARKERS.get(scheme, scheme[0])
        for p in pts:
            col = min(width - 1, round(p["step"] / max_step * (width - 1)))
            row = min(height - 1, round((hi - p["mean"]) / (hi - lo) * (height - 1)))
            cell = grid[row][col]
            grid[row][col] = mark if cell in (" ", mark) else "*"
    lines = []
    for i, row in enumerate(grid):
        y = hi - (hi - lo) * i / (height - 1)
        label = f"{y:6.3f} |" if i in (0, height // 2, height - 1) else "       |"
        lines.append(label + "".join(row))
    lines.append("       +" + "-" * width)
    lines.append(f"        step 0{' ' * (width - 6 - len(str(max_step)))}{max_step}")
    legend = "  ".join(f"{CURVE_MARKERS.get(s, s[0])}={SCHEME_LABELS.get(s, s)}" for s in curves)
    lines.append(f"        {legend}  *=overlap")
    return "\n".join(lines)


def plot_curve(curves: dict[str, list[dict[str, Any]]], path: Path, title: str) -> None:
    """PNG of judge score against training step, with 95% bootstrap bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    for scheme, pts in curves.items():
        x = [p["step"] for p in pts]
        label = SCHEME_LABELS.get(scheme, scheme)
        (line,) = ax.plot(x, [p["mean"] for p in pts], marker="o", ms=3, label=label)
        ax.fill_between(
            x, [p["lo"] for p in pts], [p["hi"] for p in pts], alpha=0.12, color=line.get_color()
        )
        if all("gain" in p for p in pts):
            g = [p["gain"] for p in pts]
            ax2.plot(
                x, [e["mean"] for e in g], marker="o", ms=3, label=label, color=line.get_color()
            )
            ax2.fill_between(
                x, [e["lo"] for e in g], [e["hi"] for e in g], alpha=0.15, color=line.get_color()
            )
    ax.set_xlabel("training step")
    ax.set_ylabel("mean judge score [95% CI]")
    ax.set_title("judge score (step 0 = base)", fontsize=9)
    ax2.axhline(0.0, color="black", lw=0.8)
    ax2.set_xlabel("training step")
    ax2.set_ylabel("gain vs base, paired [95% CI]")
    ax2.set_title("gain over the base on the same (prompt, seed)", fontsize=9)
    for a in (ax, ax2):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# ============================================================================ the benchmark
def run_benchmark(
    settings: BenchSettings,
    out: Path,
    *,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
    threads: int | None = 1,
    workers: int = 1,
) -> dict[str, Any]:
    """Runs everything and writes ``alignment.json`` and ``alignment_curve.png`` under ``out``."""
    _quiet()
    import torch

    if threads:
        torch.set_num_threads(threads)
    wall = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint_dir(settings)
    snapshot, fingerprint = snapshot_checkpoint(ckpt, out)
    log(f"base checkpoint {ckpt} (sha256 {fingerprint[:12]}), snapshot {snapshot}")
    settings = settings.replace(checkpoint=str(snapshot))
    base_model = load_base(settings)
    data = build_pairs(settings, base_model, fingerprint, out, log)
    units = eval_units(settings)
    base = base_scores(settings, base_model, fingerprint, out, log)
    del base_model
    pairs = data.to_pairs()
    dkey, ekey = data_key(settings, fingerprint), eval_key(settings, fingerprint)
    runs_dir = out / "runs"
    runs_dir.mkdir(exist_ok=True)
    for lock in runs_dir.glob("*.lock"):
        if lock_is_stale(lock):
            lock.unlink(missing_ok=True)  # left by an interrupted benchmark
    jobs = [(seed, scheme) for seed in range(settings.seeds) for scheme in settings.schemes]
    paths = {
        (seed, scheme): runs_dir
        / f"{scheme}-seed{seed}-{_hash(run_key(settings, scheme, seed, dkey, ekey))}.json"
        for seed, scheme in jobs
    }
    helpers = _spawn_helpers(settings, out, workers - 1, threads)
    try:
        _work(settings, jobs, paths, pairs, units, out, log, float(base.mean()))
        while True:  # wait for the helpers' runs; take over those of a helper that died
            missing = [job for job in jobs if not paths[job].is_file()]
            if not missing:
                break
            if all(h.poll() is not None for h in helpers):
                for job in missing:
                    if lock_is_stale(paths[job].with_suffix(".lock")):
                        paths[job].with_suffix(".lock").unlink(missing_ok=True)
                _work(settings, missing, paths, pairs, units, out, log, float(base.mean()))
                break
            time.sleep(2.0)
    finally:
        for h in helpers:
            if h.poll() is None:
                h.terminate()
                h.wait()
        for spec in out.glob(f".settings-{os.getpid()}.json"):
            spec.unlink(missing_ok=True)
    runs: dict[str, list[dict[str, Any]]] = {}
    for seed, scheme in jobs:
        runs.setdefault(scheme, []).append(json.loads(paths[(seed, scheme)].read_text()))
    summary = summarise(settings, base, runs)
    n_units = len(units[0])
    split = "held-out" if settings.eval_split == "test" else "VALIDATION"
    title = (
        f"builtin:shapes, {data.stats['pairs']} pairs"
        + (f" (best vs worst of {settings.candidates})" if settings.candidates > 2 else "")
        + f" ({settings.label_noise:.0%} label noise), "
        f"{settings.steps} steps x {settings.batch_size}"
        + (f" in {settings.rounds} online rounds" if settings.rounds > 1 else "")
        + f", {settings.seeds} seed(s), "
        f"{n_units} {split} units"
    )
    curve_png = out / "alignment_curve.png"
    plot_curve(summary["curves"], curve_png, title + (" [QUICK]" if settings.quick else ""))
    result = {
        "settings": asdict(settings),
        "checkpoint": {"path": str(ckpt), "sha256": fingerprint, "snapshot": str(snapshot)},
        "data": data.stats,
        "evaluation": {
            "split": settings.eval_split,
            "units": n_units,
            "prompts": len(set(units[0])),
            "sampling_seeds_per_prompt": settings.eval_seeds,
        },
        "base_scores": base.tolist(),
        "table": summary["rows"],
        "comparisons": summary["comparisons"],
        "curves": summary["curves"],
        "runs": runs,
        "wall_seconds": round(time.perf_counter() - wall, 1),
        "torch_threads": torch.get_num_threads(),
        "curve_png": str(curve_png),
    }
    (out / "alignment.json").write_text(json.dumps(result, indent=1))
    result["title"] = title
    return result


def report(result: dict[str, Any]) -> str:
    s = result["settings"]
    head = "Alignment benchmark: DDE vs Diffusion-DPO on builtin:shapes"
    if s["quick"]:
        head += "  [QUICK MODE: few seeds/steps/prompts, figures are indicative only]"
    if s["eval_split"] != "test":
        head += "  [VALIDATION split: for tuning, not the reported figures]"
    lines = [
        head,
        result["title"],
        f"lr {s['learning_rate']:g}, beta {s['beta']:g}, LoRA rank {s['lora_rank']}, "
        + (f"winner anchor {s['winner_anchor']:g}, " if s.get("winner_anchor") else "")
        + f"sampling: DDIM {s['num_inference_steps'] or 'default'} steps, guidance "
        f"{s['guidance_scale'] or 'default'}; 95% CIs: hierarchical bootstrap "
        f"(training seeds, then units), paired against the base",
        "",
        format_table({"rows": result["table"]}),
        "",
        format_comparisons(
            {"comparisons": result["comparisons"]}, s["seeds"], result["evaluation"]["units"]
        ),
        "",
        f"judge score vs training step (mean over seeds, on the first "
        f"{min(s['curve_units'], result['evaluation']['units'])} units; step 0 = base):",
        ascii_curve(result["curves"]),
        "",
        f"wrote {result['curve_png']} and {Path(result['curve_png']).with_name('alignment.json')} "
        f"({result['wall_seconds']:.0f} s wall)",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> tuple[BenchSettings, Path, int, int]:
    d = BenchSettings()
    p = argparse.ArgumentParser(
        prog="python -m bench.alignment", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--quick", action="store_true", help="fewer seeds/steps/prompts: < 2 min, indicative only"
    )
    p.add_argument("--seeds", type=int, help=f"training seeds per scheme (default {d.seeds})")
    p.add_argument("--steps", type=int, help=f"optimizer steps per run (default {d.steps})")
    p.add_argument("--pairs", type=int, help=f"decisive preference pairs (default {d.pairs})")
    p.add_argument(
        "--candidates",
        type=int,
        help=f"images per pair prompt; a pair is the judge's best vs worst (default {d.candidates})",
    )
    p.add_argument(
        "--label-noise", type=float, help=f"label flip probability (default {d.label_noise})"
    )
    p.add_argument("--schemes", type=str, help=f"comma-separated (default {','.join(d.schemes)})")
    p.add_argument("--batch-size", type=int, help=f"pairs per step (default {d.batch_size})")
    p.add_argument("--lr", type=float, help=f"learning rate (default {d.learning_rate:g})")
    p.add_argument(
        "--beta", type=float, help=f"beta, Diffusion-DPO reference convention (default {d.beta:g})"
    )
    p.add_argument("--rank", type=int, help=f"LoRA rank (default {d.lora_rank})")
    p.add_argument(
        "--rounds",
        type=int,
        help=f"online rounds: re-sample pairs from the current model between rounds "
        f"(default {d.rounds}: offline)",
    )
    p.add_argument(
        "--winner-anchor",
        type=float,
        help=f"DPO-Positive lambda for every scheme (default {d.winner_anchor:g}: plain DPO)",
    )
    p.add_argument(
        "--eval-prompts", type=int, help=f"evaluation prompts (default {d.eval_prompts})"
    )
    p.add_argument(
        "--eval-seeds",
        type=int,
        help=f"sampling seeds per evaluation prompt (default {d.eval_seeds})",
    )
    p.add_argument(
        "--eval-split",
        choices=("test", "validation"),
        help="'validation' for tuning (default test)",
    )
    p.add_argument(
        "--curve-points", type=int, help=f"evaluations per run (default {d.curve_points})"
    )
    p.add_argument(
        "--curve-units",
        type=int,
        help=f"units judged at intermediate steps (default {d.curve_units})",
    )
    p.add_argument(
        "--sampling-steps",
        type=int,
        help="DDIM steps of data and evaluation (default: the model's)",
    )
    p.add_argument(
        "--checkpoint", type=str, help="base checkpoint folder (default: the shipped one)"
    )
    p.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads per process (default 1)"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes sharing the training runs (default 1; 2 on an idle 2-core machine)",
    )
    p.add_argument("--out", type=Path, default=Path("bench/out"))
    a = p.parse_args(argv)
    changes: dict[str, Any] = dict(QUICK) if a.quick else {}
    mapping = {
        "seeds": a.seeds,
        "steps": a.steps,
        "pairs": a.pairs,
        "candidates": a.candidates,
        "label_noise": a.label_noise,
        "batch_size": a.batch_size,
        "learning_rate": a.lr,
        "beta": a.beta,
        "lora_rank": a.rank,
        "rounds": a.rounds,
        "winner_anchor": a.winner_anchor,
        "eval_prompts": a.eval_prompts,
        "eval_seeds": a.eval_seeds,
        "eval_split": a.eval_split,
        "curve_points": a.curve_points,
        "curve_units": a.curve_units,
        "num_inference_steps": a.sampling_steps,
        "checkpoint": a.checkpoint,
    }
    changes.update({k: v for k, v in mapping.items() if v is not None})
    if a.schemes:
        schemes = tuple(s.strip() for s in a.schemes.split(",") if s.strip())
        from worker.alignment.credit import available_schemes

        unknown = [s for s in schemes if s not in available_schemes()]
        if unknown:
            p.error(f"unknown scheme(s) {unknown}; available: {', '.join(available_schemes())}")
        changes["schemes"] = schemes
    try:
        settings = BenchSettings().replace(**changes)
    except ValueError as exc:
        p.error(str(exc))
    if a.workers < 1:
        p.error("--workers must be >= 1")
    return settings, a.out, a.threads, a.workers


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--helper-for" in argv:  # internal: a helper process of --workers
        hp = argparse.ArgumentParser()
        hp.add_argument("--helper-for", type=Path, required=True)
        hp.add_argument("--out", type=Path, required=True)
        hp.add_argument("--threads", type=int, default=1)
        h = hp.parse_args(argv)
        return _helper_main(h.helper_for, h.out, h.threads)
    settings, out, threads, workers = parse_args(argv)
    result = run_benchmark(settings, out, threads=threads, workers=workers)
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
