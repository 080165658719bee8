"""Reproducible pre-training of the built-in model ``builtin:shapes``.

Usage::

    python -m worker.shapes.pretrain --out worker/shapes/checkpoint --steps 2000 --seed 0 --threads 1

It trains the UNet and the text encoder of :func:`worker.shapes.model.build_builtin` together,
from scratch, on fresh jittered renders of the world's *training* prompts
(:func:`worker.shapes.world.split_prompts`), with:

- the plain MSE to the scheduler's target (v-prediction for the built-in model; min-SNR-γ
  weighting is available, but off: in a run this short it starves the low-noise steps);
- classifier-free-guidance dropout: 10% of the prompts are replaced by ``""``;
- AdamW with linear warm-up and cosine decay; an EMA of the weights, which is what is saved.

Then it samples the *held-out* prompts with DDIM and scores them with the judge, next to the
judge's score of the world's own renders of the same prompts, and writes both figures into the
checkpoint (``model_index.json`` ``metadata.evaluation``) and its ``README.md``.

The run is seeded (torch, numpy) and uses only the CPU by default; the same command on the same
machine gives the same weights. The model is deliberately left *imperfect* (a short schedule),
so that alignment has something to fix.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from worker.alignment.backbone import Backbone
from worker.alignment.sampling import sample
from worker.shapes import judge, world
from worker.shapes.model import BuiltinConfig, build_builtin, save_builtin


@dataclass
class PretrainConfig:
    """Settings of one pre-training run.

    Attributes:
        steps: optimiser steps.
        batch_size: renders per step.
        lr: peak learning rate (AdamW).
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps.
        min_lr_fraction: the cosine decay ends at ``lr * min_lr_fraction``.
        cfg_dropout: probability of replacing a prompt by ``""``.
        snr_gamma: γ of the min-SNR loss weighting; 0 (the default) disables it.
        ema_decay: decay of the weight EMA (warmed up as ``min(decay, (1+k)/(10+k))``).
        seed: seed of everything (initialisation, data, noise).
        split_seed: seed of the train/held-out prompt split.
        eval_prompts: held-out prompts sampled for the evaluation (one image each).
        eval_seed: seed of the evaluation's prompt choice and of its images' seeds.
        grad_clip: gradient-norm clip.
    """

    steps: int = 2000
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    min_lr_fraction: float = 0.1
    cfg_dropout: float = 0.1
    snr_gamma: float = 0.0
    ema_decay: float = 0.995
    seed: int = 0
    split_seed: int = 0
    eval_prompts: int = 96
    eval_seed: int = 1234
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError("steps must be >= 1")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if not 0.0 <= self.cfg_dropout < 1.0:
            raise ValueError("cfg_dropout must be in [0, 1)")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError("ema_decay must be in [0, 1)")
        if self.lr <= 0:
            raise ValueError("lr must be > 0")


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """``[N, H, W, 3]`` uint8 -> ``[N, 3, H, W]`` float32 in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def min_snr_weights(
    alphas_cumprod: torch.Tensor,
    timesteps: torch.Tensor,
    gamma: float,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """Per-sample min-SNR-γ loss weights: ``min(SNR_t, γ) / SNR_t`` for epsilon prediction,
    ``min(SNR_t, γ) / (SNR_t + 1)`` for v-prediction.

    Shapes: ``alphas_cumprod [T]``, ``timesteps [B]`` -> ``[B]``. ``SNR_t = ᾱ_t / (1 - ᾱ_t)``.
    """
    a = alphas_cumprod.to(torch.float64)[timesteps]
    snr = a / (1.0 - a)
    denom = snr + 1.0 if prediction_type == "v_prediction" else snr
    return (torch.clamp(snr, max=gamma) / denom).float()


def training_target(
    scheduler: Any, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """What the UNet learns to output: ε, v = √ᾱ ε - √(1-ᾱ) x0, or x0, per the scheduler."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    if kind == "sample":
        return x0
    raise ValueError(f"unsupported prediction_type {kind!r}")


def _lr_at(step: int, cfg: PretrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * (cfg.min_lr_fraction + (1.0 - cfg.min_lr_fraction) * cosine)


def evaluation_prompts(n: int, seed: int, split_seed: int = 0) -> list[str]:
    """``n`` held-out prompts chosen deterministically (the evaluation set of the README)."""
    _, held_out = world.split_prompts(split_seed)
    order = np.random.default_rng(seed).permutation(len(held_out))
    return [held_out[i] for i in order[: min(n, len(held_out))]]


def evaluate(
    backbone: Backbone,
    prompts: list[str],
    *,
    seed: int = 1234,
    guidance_scale: float | None = None,
    num_inference_steps: int | None = None,
) -> dict[str, Any]:
    """Judge scores of ``backbone``'s samples of ``prompts`` and of the world's renders of them.

    Image ``i`` uses seed ``seed + i``; the renders use ``np.random.default_rng(seed)`` jitter.
    """
    images = sample(
        backbone,
        prompts,
        [seed + i for i in range(len(prompts))],
        guidance_scale=guidance_scale,
        num_inference_steps=num_inference_steps,
    )
    model_results = [judge.judge(g.image, p) for g, p in zip(images, prompts, strict=True)]
    rng = np.random.default_rng(seed)
    render_results = [
        judge.judge(world.render(world.parse_prompt(p), size=backbone.resolution, rng=rng), p)
        for p in prompts
    ]

    def summary(results: list[judge.JudgeResult]) -> dict[str, Any]:
        scores = np.array([r.score for r in results])
        return {
            "mean": round(float(scores.mean()), 4),
            "sem": round(float(scores.std(ddof=1) / np.sqrt(len(scores))), 4)
            if len(scores) > 1
            else 0.0,
            "components": {
                k: round(float(np.mean([r.components[k] for r in results])), 4)
                for k in judge.WEIGHTS
            },
        }

    return {
        "prompts": len(prompts),
        "guidance_scale": images[0].guidance_scale,
        "num_inference_steps": images[0].num_inference_steps,
        "sampler": images[0].sampler,
        "model": summary(model_results),
        "renders": summary(render_results),
    }


def pretrain(
    cfg: PretrainConfig,
    *,
    progress: bool = True,
    model_config: BuiltinConfig | None = None,
    eval_every: int = 0,
) -> tuple[Backbone, dict[str, Any]]:
    """Train ``builtin:shapes`` from scratch; returns the EMA model and training statistics.

    With ``eval_every > 0`` the EMA model is judged on 32 held-out prompts every that many steps
    (printed, and kept in ``stats["curve"]``); this draws no random numbers from the training
    streams, so it does not change the result.
    """
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    mcfg = model_config if model_config is not None else BuiltinConfig(seed=cfg.seed)
    backbone = build_builtin(mcfg)
    unet, text_encoder, tokenizer = backbone.unet, backbone.text_encoder, backbone.tokenizer
    scheduler = backbone.scheduler
    T = backbone.num_train_timesteps
    alphas_cumprod = torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float32)
    train_prompts, _ = world.split_prompts(cfg.split_seed)
    pool = [world.parse_prompt(p) for p in train_prompts]

    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema_unet = copy.deepcopy(unet).requires_grad_(False)
    ema_text = copy.deepcopy(text_encoder).requires_grad_(False)
    ema_pairs = list(
        zip(list(ema_unet.parameters()) + list(ema_text.parameters()), params, strict=True)
    )
    # what is evaluated during training and returned: the EMA weights, updated in place
    trained = dataclasses.replace(
        backbone, unet=ema_unet, text_encoder=ema_text, extra=dict(backbone.extra)
    )
    unet.train()
    text_encoder.train()

    losses: list[float] = []
    curve: list[dict[str, Any]] = []
    eval_prompts = evaluation_prompts(32, cfg.eval_seed, cfg.split_seed)
    started = time.perf_counter()
    bar = tqdm(range(cfg.steps), disable=not progress, desc="pretrain builtin:shapes", unit="step")
    for step in bar:
        scenes = world.sample_scenes(cfg.batch_size, rng, pool)
        x0 = images_to_tensor(world.render_batch(scenes, size=mcfg.resolution, rng=rng))
        prompts = [s.prompt if rng.random() >= cfg.cfg_dropout else "" for s in scenes]
        ids = tokenizer(
            prompts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        hidden = text_encoder(ids)[0]
        noise = torch.randn_like(x0)
        t = torch.randint(0, T, (cfg.batch_size,))
        x_t = scheduler.add_noise(x0, noise, t)
        pred = unet(x_t, t, encoder_hidden_states=hidden).sample
        target = training_target(scheduler, x0, noise, t)
        per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
        if cfg.snr_gamma > 0:
            per_sample = per_sample * min_snr_weights(
                alphas_cumprod, t, cfg.snr_gamma, scheduler.config.prediction_type
            )
        loss = per_sample.mean()
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in ema_pairs:
                e.lerp_(p.detach(), 1.0 - decay)
        losses.append(loss.item())
        if step % 25 == 0 or step == cfg.steps - 1:
            bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}")
        if eval_every > 0 and (step + 1) % eval_every == 0:
            with torch.random.fork_rng(devices=[]):
                result = evaluate(trained, eval_prompts, seed=cfg.eval_seed)
            curve.append(
                {
                    "step": step + 1,
                    "judge": result["model"]["mean"],
                    "loss": round(float(np.mean(losses[-100:])), 5),
                }
            )
            bar.write(
                f"step {step + 1}: held-out judge {result['model']['mean']:.3f} {result['model']['components']}"
            )
    bar.close()
    elapsed = time.perf_counter() - started

    ema_unet.eval()
    ema_text.eval()
    stats = {
        "train_seconds": round(elapsed, 1),
        "final_loss": round(float(np.mean(losses[-100:])), 5),
        "unet_parameters": sum(p.numel() for p in ema_unet.parameters()),
        "text_encoder_parameters": sum(p.numel() for p in ema_text.parameters()),
        "train_prompts": len(train_prompts),
    }
    if curve:
        stats["curve"] = curve
    return trained, stats


def write_readme(
    out: Path, cfg: PretrainConfig, stats: dict[str, Any], evaluation: dict[str, Any], command: str
) -> None:
    m, r = evaluation["model"], evaluation["renders"]
    size_kb = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1024
    rows = "\n".join(
        f"| {k} | {m['components'][k]:.3f} | {r['components'][k]:.3f} |" for k in judge.WEIGHTS
    )
    text = f"""# builtin:shapes base checkpoint

The pre-trained base model of Prefloop's built-in world (see `worker/shapes/`). It is shipped
with the code; `worker.shapes.model.load_builtin()` loads it from here, offline.

Made by:

    {command}

on {stats["platform"]} with torch {torch.__version__}, in {stats["train_seconds"]:.0f} s of training
({cfg.steps} steps of {cfg.batch_size} renders; final EMA-window loss {stats["final_loss"]}).
UNet: {stats["unet_parameters"]:,} parameters; text encoder: {stats["text_encoder_parameters"]:,}.
Weights are stored in fp16 ({size_kb:.0f} KB for the whole folder).

## How good is it?

Judge score (`worker.shapes.judge`, in [0, 1]) of one sample for each of {evaluation["prompts"]} **held-out**
prompts (never seen in pre-training), DDIM {evaluation["num_inference_steps"]} steps, guidance
{evaluation["guidance_scale"]}, seeds {cfg.eval_seed}..{cfg.eval_seed + evaluation["prompts"] - 1}, against the judge's
score of the world's own renders of the same prompts:

| | mean | ± s.e. |
|---|---|---|
| base model samples | {m["mean"]:.3f} | {m["sem"]:.3f} |
| renders (reference) | {r["mean"]:.3f} | {r["sem"]:.3f} |

Per component (mean match in [0, 1]):

| component | base model | renders |
|---|---|---|
{rows}

The gap between the two rows is what alignment has to close.
The same figures are in `model_index.json` under `metadata.evaluation`.
"""
    (out / "README.md").write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m worker.shapes.pretrain", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--out", required=True, type=Path, help="checkpoint folder to write (replaced if it exists)"
    )
    parser.add_argument("--steps", type=int, default=PretrainConfig.steps)
    parser.add_argument("--seed", type=int, default=PretrainConfig.seed)
    parser.add_argument("--batch-size", type=int, default=PretrainConfig.batch_size)
    parser.add_argument("--lr", type=float, default=PretrainConfig.lr)
    parser.add_argument("--eval-prompts", type=int, default=PretrainConfig.eval_prompts)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument(
        "--eval-every", type=int, default=0, help="judge the EMA model every N steps (0: never)"
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = PretrainConfig(
        steps=args.steps,
        seed=args.seed,
        batch_size=args.batch_size,
        lr=args.lr,
        eval_prompts=args.eval_prompts,
    )
    backbone, stats = pretrain(cfg, progress=not args.no_progress, eval_every=args.eval_every)
    stats["platform"] = (
        f"{platform.system()} {platform.machine()}, {torch.get_num_threads()} CPU threads"
    )
    prompts = evaluation_prompts(cfg.eval_prompts, cfg.eval_seed, cfg.split_seed)
    started = time.perf_counter()
    evaluation = evaluate(backbone, prompts, seed=cfg.eval_seed)
    evaluation["seconds"] = round(time.perf_counter() - started, 1)
    command = (
        f"python -m worker.shapes.pretrain --out {args.out} --steps {cfg.steps} --seed {cfg.seed}"
    )
    if cfg.batch_size != PretrainConfig.batch_size:
        command += f" --batch-size {cfg.batch_size}"
    if cfg.lr != PretrainConfig.lr:
        command += f" --lr {cfg.lr}"
    if args.threads:
        command += f" --threads {args.threads}"
    metadata = {
        "pretrain": {"config": asdict(cfg), **stats, "command": command},
        "evaluation": evaluation,
    }
    out = save_builtin(backbone, args.out, metadata=metadata)
    write_readme(out, cfg, stats, evaluation, command)
    print(json.dumps({"out": str(out), **stats, "evaluation": evaluation}, indent=2))
    print(
        f"held-out judge score: base samples {evaluation['model']['mean']:.3f} "
        f"vs renders {evaluation['renders']['mean']:.3f} ({evaluation['prompts']} prompts)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
