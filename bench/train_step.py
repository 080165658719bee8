"""Cost of one training step: DDE against Diffusion-DPO, side by side, through the real trainer.

For each model and fine-tuning mode it runs :func:`worker.alignment.trainer.train` (the code a
training round runs, with a :class:`~worker.alignment.config.TrainConfig`) on the same pairs,
with the same batch and seed, under three credit settings:

- ``dde`` / ``importance`` (the project's default: DDE's timesteps, weight 1),
- ``uniform`` (Diffusion-DPO: uniform timesteps, weight 1),
- ``dde`` / ``weighted`` (uniform timesteps, each pair's loss weighted by DDE's credit),

and prints seconds per optimizer step (the median over the timed steps; warm-up steps are left
out), pairs per second, peak memory, and each row's cost relative to Diffusion-DPO on the same
model, then a one-line verdict: does DDE cost no more than Diffusion-DPO per pair, within a
stated tolerance?

Models (all with random weights unless a trained built-in checkpoint is installed; speed does not
depend on the weights):

- ``builtin``: ``builtin:shapes`` (32x32 pixel-space UNet, about 1.4M parameters), LoRA r=8
  and full fine-tune. Loaded with ``load_builtin()`` when ``worker/shapes/checkpoint/`` exists,
  else built from its config with ``build_builtin()`` (random weights; the output says which).
- ``tiny-sd``: a tiny SD1.5-architecture pipeline (UNet blocks (32, 64), VAE, CLIP text encoder)
  built from configs, written with ``save_pretrained`` and loaded back through
  ``load_backbone`` (the real ``from_pretrained`` path), LoRA r=8, 64x64 images.
- ``--gpu-sd15`` (CUDA only): the full-size SD1.5 UNet (``sd15_unet_config()``, 860M
  parameters) with random weights, LoRA r=8, bf16 mixed precision, 512x512 images. It is
  wrapped in a :class:`~worker.alignment.backbone.Backbone` with an SD1.5-sized VAE
  (AutoencoderKL with blocks 128/256/512/512, random weights) and a CLIP-L-sized text encoder
  (12 layers, width 768, 77 tokens; random weights, the offline byte-level tokenizer), so that
  the step is exactly the trainer's: VAE encoding of the 16 images, text encoding, reference
  forward (adapters disabled), policy forward and backward, AdamW. Without CUDA this part prints
  that it was skipped.

Isolation: every run happens in its own process, so peak memory is per configuration. The
processes are forked from a ``multiprocessing`` fork server that has imported torch, diffusers
and transformers once (importing them takes 5-15 s here, too long to pay per row); a forked child
starts with its own peak-RSS counter, so ``ru_maxrss`` is that child's peak (it includes the
~0.3-0.5 GB of the imported libraries, the same for every row). On a GPU, peak memory is
``torch.cuda.max_memory_allocated()``.

Timing: ``StepMetrics.seconds`` from the trainer's history (wall time of one optimizer step:
data, timestep and noise draws, VAE/text encoding, reference and policy passes, backward,
clipping, optimizer), the median over the timed steps of all rounds. The rows of one model run
next to each other, in the opposite order in each round, so that a slow spell of the shared
machine hits them alike. The process CPU time per step is recorded too (``cpu s/step``): on a
CPU shared with other jobs it is steadier than wall time.

    python -m bench.train_step              # full: 2 rounds, 8 timed steps per run (3-9 min)
    python -m bench.train_step --quick      # the same table, fewer steps (< 2 min)
    python -m bench.train_step --gpu-sd15   # also the full-size SD1.5 UNet on CUDA
    python -m bench.train_step --cache-only --rounds 3   # the encode cache, before and after

The encode cache table (``--cache-compare``, or ``--cache-only`` without the DDE/DPO table)
trains tiny SD (and, with ``--gpu-sd15`` on CUDA, the SD1.5 UNet) with
``train(..., encode_cache=False)`` (before: the VAE and the text encoder run at every step) and
``encode_cache=True`` (after: encoded once per run, :mod:`worker.alignment.encode_cache`), in
alternating order, and prints pairs/s, CPU time and peak memory of each with the ratios, and the
pairs/s of the whole ``train()`` call (the cache's build included). docs/training-throughput.md.

The figures also go to ``bench/out/train_step.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from bench.report import fmt, format_table

DEFAULT_OUT = Path(__file__).resolve().parent / "out" / "train_step.json"
RESULT_TIMEOUT_S = 900

#: (model, finetune) groups measured on every machine.
GROUPS: list[tuple[str, str]] = [("builtin", "lora"), ("builtin", "full"), ("tiny-sd", "lora")]
#: (scheme, timestep_mode) rows of each group; ``uniform`` is Diffusion-DPO, the baseline.
METHODS: list[tuple[str, str]] = [
    ("dde", "importance"),
    ("uniform", "importance"),
    ("dde", "weighted"),
]
BASELINE = ("uniform", "importance")
LORA_RANK = 8

#: Imported once by the fork server, so that each forked child starts in well under a second.
_PRELOAD = [
    "numpy",
    "torch",
    "accelerate",
    "peft",
    "diffusers",
    "transformers",
    "diffusers.models.unets.unet_2d_condition",
    "diffusers.models.autoencoders.autoencoder_kl",
    "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion",
    "diffusers.schedulers.scheduling_ddpm",
    "diffusers.schedulers.scheduling_ddim",
    "diffusers.optimization",
    "diffusers.training_utils",
    "transformers.models.clip.modeling_clip",
    "transformers.models.clip.tokenization_clip",
    "worker.alignment.trainer",
    "worker.alignment.models",
    "worker.alignment.tiny_models",
    "worker.shapes.model",
    "worker.shapes.world",
]


# ============================================================================ child side
def _rss_mb() -> float:
    """Current resident set size of this process, in MiB (Linux; NaN elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def _peak_rss_mb() -> float:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def _make_pairs(n: int, resolution: int, seed: int) -> list[Any]:
    """``n`` preference pairs of rendered ``builtin:shapes`` scenes at ``resolution`` pixels.

    Deterministic in ``seed``: every row of the benchmark trains on the same pairs.
    """
    import numpy as np

    from worker.alignment.trainer import PreferencePair
    from worker.shapes import world

    rng = np.random.default_rng(seed)
    winners = world.sample_scenes(n, rng)
    losers = world.sample_scenes(n, rng)
    return [
        PreferencePair(
            prompt=w.prompt,
            winner=world.render(w, size=resolution, rng=rng),
            loser=world.render(lo, size=resolution, rng=rng),
        )
        for w, lo in zip(winners, losers, strict=True)
    ]


def _build_sd15_backbone(small: bool = False) -> Any:
    """A Backbone around the full-size SD1.5 UNet with random weights (see the module docstring).

    ``small=True`` shrinks every part (same classes and wiring) so the code path can be checked
    on a CPU in seconds; the benchmark never uses it.
    """
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from worker.alignment.backbone import Backbone
    from worker.alignment.tiny_models import build_tiny_clip_tokenizer, sd15_unet_config

    device = "cuda" if torch.cuda.is_available() else "cpu"
    unet_cfg = sd15_unet_config()
    vae_channels = [128, 256, 512, 512]
    text_layers, text_width, text_ff = 12, 768, 3072
    if small:
        unet_cfg.update(block_out_channels=[32, 32, 64, 64], layers_per_block=1)
        vae_channels = [32, 32, 32, 32]
        text_layers, text_ff = 1, 128
    tokenizer = build_tiny_clip_tokenizer(model_max_length=77)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        unet = UNet2DConditionModel.from_config(unet_cfg)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            block_out_channels=vae_channels,
            layers_per_block=2,
            latent_channels=4,
            sample_size=512,
            scaling_factor=0.18215,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=text_width,
                intermediate_size=text_ff,
                num_hidden_layers=text_layers,
                num_attention_heads=12,
                max_position_embeddings=77,
                hidden_act="quick_gelu",
                projection_dim=768,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    vae.eval()
    text_encoder.eval()
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
    )
    return Backbone(
        kind="sd",
        unet=unet,
        scheduler=scheduler,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        vae=vae,
        resolution=64 if small else 512,
        name="sd15-architecture (random weights)",
    )


def _build_backbone(spec: dict[str, Any]) -> tuple[Any, str]:
    """The row's model and a note on where its weights come from."""
    model = spec["model"]
    if model == "builtin":
        from worker.shapes.model import DEFAULT_CHECKPOINT, MODEL_INDEX, build_builtin, load_builtin

        if (DEFAULT_CHECKPOINT / MODEL_INDEX).is_file():
            return load_builtin(), f"trained checkpoint {DEFAULT_CHECKPOINT}"
        return build_builtin(), "random weights (no checkpoint in worker/shapes/checkpoint/)"
    if model == "tiny-sd":
        from worker.alignment.models import load_backbone

        bb = load_backbone(spec["tiny_sd_path"], local_files_only=True)
        return bb, "random weights, saved with save_pretrained and loaded by load_backbone"
    if model == "sd15":
        return _build_sd15_backbone(
            small=bool(spec.get("small"))
        ), "random weights, SD1.5 UNet config"
    raise ValueError(f"unknown model {model!r}")


def _child_measure(spec: dict[str, Any]) -> dict[str, Any]:
    """One configuration: build the model, train ``warmup + steps`` steps, report the figures."""
    import torch

    from worker.alignment.config import TrainConfig
    from worker.alignment.trainer import train

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    cuda = torch.cuda.is_available()
    started = time.perf_counter()
    backbone, weights = _build_backbone(spec)
    pairs = _make_pairs(spec["n_pairs"], backbone.resolution, seed=spec["data_seed"])
    rss_before = _rss_mb()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    setup_s = time.perf_counter() - started

    config = TrainConfig(
        scheme=spec["scheme"],
        timestep_mode=spec["mode"],
        steps=spec["warmup"] + spec["steps"],
        batch_size=spec["batch_size"],
        finetune=spec["finetune"],
        lora_rank=LORA_RANK,
        mixed_precision=spec.get("mixed_precision", "no"),
        gradient_checkpointing=bool(spec.get("gradient_checkpointing", False)),
        seed=spec["seed"],
        checkpoint_every=0,
        log_every=1,
        # random weights and random-ish data: never stop a timing run on a "spike"
        loss_spike_factor=None,
    )
    cpu_marks: list[float] = []
    wall_marks: list[float] = []

    def progress(_metrics: Any) -> None:
        cpu_marks.append(time.process_time())
        wall_marks.append(time.perf_counter())

    with tempfile.TemporaryDirectory(prefix="bench-train-step-") as out:
        cpu_marks.append(time.process_time())
        t0 = time.perf_counter()
        result = train(
            backbone,
            pairs,
            config,
            output_dir=out,
            progress=progress,
            resume=False,
            progress_bar=False,
            encode_cache=bool(spec.get("encode_cache", True)),
        )
        train_wall = time.perf_counter() - t0
    seconds = [float(m.seconds) for m in result.history]
    cpu = [b - a for a, b in zip(cpu_marks[:-1], cpu_marks[1:], strict=True)]
    warm = spec["warmup"]
    losses = [float(m.loss) for m in result.history]
    row: dict[str, Any] = {
        "step_seconds": seconds,
        "timed_seconds": seconds[warm:],
        "timed_cpu_seconds": cpu[warm:] if not cuda else [],
        "losses": losses,
        "timesteps_histogram": [list(m.timestep_histogram) for m in result.history],
        "setup_seconds": setup_s,
        "train_wall_seconds": train_wall,
        "trained_pairs": (spec["warmup"] + spec["steps"]) * spec["batch_size"],
        "encode_cache": bool(spec.get("encode_cache", True)),
        "rss_before_train_mb": rss_before,
        "peak_rss_mb": _peak_rss_mb(),
        "weights": weights,
        "device": "cuda" if cuda else "cpu",
        "threads": torch.get_num_threads(),
        "unet_parameters": sum(p.numel() for p in backbone.unet.parameters()),
        "trainable_parameters": sum(
            p.numel() for p in backbone.unet.parameters() if p.requires_grad
        ),
    }
    if cuda:
        row["peak_cuda_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
        row["gpu_name"] = torch.cuda.get_device_name(0)
        row["peak_mb"] = row["peak_cuda_allocated_mb"]
        row["peak_kind"] = "torch.cuda.max_memory_allocated"
    else:
        row["peak_mb"] = row["peak_rss_mb"]
        row["peak_kind"] = "ru_maxrss"
    return row


def _child_build_tiny_sd(path: str) -> dict[str, Any]:
    from worker.alignment.tiny_models import build_tiny_sd

    t0 = time.perf_counter()
    build_tiny_sd(path, seed=0)
    return {"path": path, "seconds": time.perf_counter() - t0}


def _child_env(_: Any) -> dict[str, Any]:
    import diffusers
    import torch
    import transformers

    from worker.shapes.model import DEFAULT_CHECKPOINT, MODEL_INDEX

    info: dict[str, Any] = {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.cuda.is_available(),
        "torch_default_threads": torch.get_num_threads(),
        "builtin_checkpoint": (DEFAULT_CHECKPOINT / MODEL_INDEX).is_file(),
    }
    if info["cuda"]:
        info["gpu_name"] = torch.cuda.get_device_name(0)
    return info


def _quiet_child() -> None:
    """Keeps the parent's stdout for the table: the child's stdout goes to stderr, no bars."""
    try:
        sys.stdout.flush()
        os.dup2(2, 1)  # also catches output of native code (tokenizers' trainer prints blank lines)
    except OSError:
        pass
    try:
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        dlog.disable_progress_bar()
        tlog.disable_progress_bar()
    except Exception:  # noqa: BLE001 - cosmetic only
        pass


def _child_entry(fn: Any, arg: Any, conn: Any) -> None:
    try:
        _quiet_child()
        conn.send(("ok", fn(arg)))
    except BaseException:  # noqa: BLE001 - reported to the parent, which decides
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


# ============================================================================ parent side
class ChildError(RuntimeError):
    pass


def _call(ctx: Any, fn: Any, arg: Any, timeout: float = RESULT_TIMEOUT_S) -> Any:
    """Runs ``fn(arg)`` in a fresh process forked by the fork server; returns its result."""
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_entry, args=(fn, arg, send), daemon=True)
    proc.start()
    send.close()
    try:
        if not recv.poll(timeout):
            proc.kill()
            raise ChildError(f"{fn.__name__} timed out after {timeout:.0f} s")
        try:
            status, payload = recv.recv()
        except EOFError:
            proc.join(10)
            raise ChildError(
                f"{fn.__name__}: the process died (exit code {proc.exitcode})"
            ) from None
    finally:
        recv.close()
        proc.join(30)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    if status != "ok":
        raise ChildError(payload)
    return payload


def _median(values: list[float]) -> float:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(vals) if vals else float("nan")


def _spread(values: list[float]) -> float | None:
    """max/min - 1 of per-round medians, or None with fewer than two rounds."""
    vals = [v for v in values if math.isfinite(v)]
    if len(vals) < 2 or min(vals) <= 0:
        return None
    return max(vals) / min(vals) - 1.0


def _aggregate(runs: list[dict[str, Any]], batch_size: int) -> dict[str, Any]:
    """Pools the timed steps of one configuration's runs (one per round)."""
    wall = [s for r in runs for s in r["timed_seconds"]]
    cpu = [s for r in runs for s in r["timed_cpu_seconds"]]
    s_step = _median(wall)
    cpu_step = _median(cpu) if cpu else float("nan")
    round_medians = [_median(r["timed_seconds"]) for r in runs]
    cpu_round_medians = [_median(r["timed_cpu_seconds"]) for r in runs if r["timed_cpu_seconds"]]
    return {
        "s_per_step": s_step,
        "pairs_per_s": batch_size / s_step if s_step > 0 else float("nan"),
        "cpu_s_per_step": cpu_step,
        "peak_mb": max(r["peak_mb"] for r in runs),
        "peak_kind": runs[0]["peak_kind"],
        "round_medians_s": round_medians,
        "round_spread": _spread(round_medians),
        "cpu_round_medians_s": cpu_round_medians,
        "cpu_round_spread": _spread(cpu_round_medians),
        "timed_steps": len(wall),
        "runs": runs,
    }


def _run_rows(
    ctx: Any,
    groups: list[tuple[str, str]],
    base: dict[str, Any],
    rounds: int,
    extra: dict[str, Any] | None = None,
) -> dict[tuple[str, str, str, str], dict[str, Any]]:
    runs: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    total = len(groups) * len(METHODS) * rounds
    done = 0
    for r in range(rounds):
        for model, finetune in groups:
            order = METHODS if r % 2 == 0 else list(reversed(METHODS))
            for scheme, mode in order:
                spec = {
                    **base,
                    **(extra or {}),
                    "model": model,
                    "finetune": finetune,
                    "scheme": scheme,
                    "mode": mode,
                }
                done += 1
                t0 = time.perf_counter()
                res = _call(ctx, _child_measure, spec)
                med = _median(res["timed_seconds"])
                print(
                    f"  [{done}/{total}] round {r + 1} {model:8s} {finetune:4s} {scheme:8s} "
                    f"{mode:10s} {med:.4f} s/step, peak {res['peak_mb']:.0f} MB "
                    f"({time.perf_counter() - t0:.1f} s)",
                    file=sys.stderr,
                    flush=True,
                )
                runs.setdefault((model, finetune, scheme, mode), []).append(res)
    return {key: _aggregate(v, base["batch_size"]) for key, v in runs.items()}


def _add_ratios(rows: dict[tuple[str, str, str, str], dict[str, Any]]) -> None:
    for (model, finetune, _scheme, _mode), agg in rows.items():
        ref = rows.get((model, finetune, *BASELINE))
        if ref is None:
            agg["ratio"] = agg["cpu_ratio"] = agg["peak_ratio"] = float("nan")
            continue
        agg["ratio"] = agg["s_per_step"] / ref["s_per_step"]
        agg["cpu_ratio"] = (
            agg["cpu_s_per_step"] / ref["cpu_s_per_step"]
            if math.isfinite(ref["cpu_s_per_step"]) and ref["cpu_s_per_step"] > 0
            else float("nan")
        )
        agg["peak_ratio"] = agg["peak_mb"] / ref["peak_mb"]


# ============================================================================ the encode cache
#: groups of the encode-cache comparison: the models with a VAE (the built-in model has none).
CACHE_GROUPS: list[tuple[str, str]] = [("tiny-sd", "lora")]
CacheKey = tuple[str, str, str, str, bool]


def _run_cache_rows(
    ctx: Any,
    groups: list[tuple[str, str]],
    methods: list[tuple[str, str]],
    base: dict[str, Any],
    rounds: int,
) -> dict[CacheKey, dict[str, Any]]:
    """Each (group, method) trained with ``encode_cache=False`` (before: the VAE and the text
    encoder run at every step) and ``True`` (after), next to each other, in the opposite order
    in each round, so that a slow spell of the shared machine hits both alike."""
    runs: dict[CacheKey, list[dict[str, Any]]] = {}
    total = len(groups) * len(methods) * 2 * rounds
    done = 0
    for r in range(rounds):
        for model, finetune in groups:
            for scheme, mode in methods:
                for cache in (False, True) if r % 2 == 0 else (True, False):
                    spec = {
                        **base,
                        "model": model,
                        "finetune": finetune,
                        "scheme": scheme,
                        "mode": mode,
                        "encode_cache": cache,
                    }
                    done += 1
                    t0 = time.perf_counter()
                    res = _call(ctx, _child_measure, spec)
                    print(
                        f"  [{done}/{total}] round {r + 1} {model:8s} {finetune:4s} {scheme:8s} "
                        f"{mode:10s} cache {'on ' if cache else 'off'} "
                        f"{_median(res['timed_seconds']):.4f} s/step, peak "
                        f"{res['peak_mb']:.0f} MB ({time.perf_counter() - t0:.1f} s)",
                        file=sys.stderr,
                        flush=True,
                    )
                    runs.setdefault((model, finetune, scheme, mode, cache), []).append(res)
    rows = {}
    for key, v in runs.items():
        agg = _aggregate(v, base["batch_size"])
        agg["run_pairs_per_s"] = _median([x["trained_pairs"] / x["train_wall_seconds"] for x in v])
        rows[key] = agg
    for (model, finetune, scheme, mode, cache), agg in rows.items():
        before = rows.get((model, finetune, scheme, mode, False))
        if not cache or before is None:
            agg["speedup"] = agg["cpu_speedup"] = agg["run_speedup"] = agg["peak_ratio"] = float(
                "nan"
            )
            continue
        agg["speedup"] = agg["pairs_per_s"] / before["pairs_per_s"]
        agg["cpu_speedup"] = before["cpu_s_per_step"] / agg["cpu_s_per_step"]
        agg["run_speedup"] = agg["run_pairs_per_s"] / before["run_pairs_per_s"]
        agg["peak_ratio"] = agg["peak_mb"] / before["peak_mb"]
    return rows


CACHE_HEADERS = [
    "model",
    "finetune",
    "scheme",
    "mode",
    "encode cache",
    "s/step",
    "pairs/s",
    "speedup",
    "cpu s/step",
    "cpu speedup",
    "peak MB",
    "peak ratio",
    "run pairs/s",
    "run speedup",
]


def _cache_table(rows: dict[CacheKey, dict[str, Any]]) -> str:
    lines = []
    for (model, finetune, scheme, mode, cache), a in rows.items():
        base = "1.00 (before)"
        lines.append(
            [
                MODEL_LABELS.get(model, model),
                finetune,
                "uniform (DPO)" if scheme == "uniform" else scheme,
                mode,
                "on (after)" if cache else "off (before)",
                fmt(a["s_per_step"], 4),
                fmt(a["pairs_per_s"], 2),
                fmt(a["speedup"], 2) if cache else base,
                fmt(a["cpu_s_per_step"], 4),
                fmt(a["cpu_speedup"], 2) if cache else base,
                fmt(a["peak_mb"], 0),
                fmt(a["peak_ratio"], 2) if cache else base,
                fmt(a["run_pairs_per_s"], 2),
                fmt(a["run_speedup"], 2) if cache else base,
            ]
        )
    return format_table(CACHE_HEADERS, lines, align="lllll" + "r" * (len(CACHE_HEADERS) - 5))


def _jsonable_cache(rows: dict[CacheKey, dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"model": m, "finetune": f, "scheme": s, "mode": md, "encode_cache": c, **a}
        for (m, f, s, md, c), a in rows.items()
    ]


MODEL_LABELS = {"builtin": "builtin:shapes", "tiny-sd": "tiny-sd", "sd15": "sd15-arch"}
HEADERS = [
    "model",
    "finetune",
    "scheme",
    "mode",
    "s/step",
    "pairs/s",
    "peak MB",
    "DDE/DPO cost ratio",
    "cpu s/step",
    "cpu ratio",
]


def _table(rows: dict[tuple[str, str, str, str], dict[str, Any]]) -> str:
    lines = []
    for (model, finetune, scheme, mode), a in rows.items():
        is_base = (scheme, mode) == BASELINE
        lines.append(
            [
                MODEL_LABELS.get(model, model),
                finetune,
                "uniform (DPO)" if scheme == "uniform" else scheme,
                mode,
                fmt(a["s_per_step"], 4),
                fmt(a["pairs_per_s"], 2),
                fmt(a["peak_mb"], 0),
                "1.00 (base)" if is_base else fmt(a["ratio"], 2),
                fmt(a["cpu_s_per_step"], 4),
                "1.00 (base)"
                if is_base and math.isfinite(a["cpu_ratio"])
                else fmt(a["cpu_ratio"], 2),
            ]
        )
    return format_table(HEADERS, lines, align="llll" + "r" * (len(HEADERS) - 4))


def _verdict(
    rows: dict[tuple[str, str, str, str], dict[str, Any]], tolerance: float
) -> dict[str, Any]:
    """DDE (importance) vs Diffusion-DPO per pair, on every model measured.

    The decision uses the process CPU time per step on a CPU (single-threaded, it counts the
    work done, while wall time on a shared machine also counts the other jobs) and wall time on
    a GPU. Both ratios are printed.
    """
    per_group = {
        f"{model}/{finetune}": {
            "ratio": a["ratio"],
            "cpu_ratio": a["cpu_ratio"],
            "peak_ratio": a["peak_ratio"],
        }
        for (model, finetune, scheme, mode), a in rows.items()
        if (scheme, mode) == ("dde", "importance")
    }
    limit = 1.0 + tolerance
    use_cpu = bool(per_group) and all(math.isfinite(g["cpu_ratio"]) for g in per_group.values())
    key = "cpu_ratio" if use_cpu else "ratio"
    decisive = [g[key] for g in per_group.values()]
    ok = bool(decisive) and all(math.isfinite(r) and r <= limit for r in decisive)
    wall_ok = all(math.isfinite(g["ratio"]) and g["ratio"] <= limit for g in per_group.values())
    peak_ok = all(g["peak_ratio"] <= limit for g in per_group.values())
    wall_listing = ", ".join(f"{k} {v['ratio']:.2f}" for k, v in per_group.items())
    cpu_listing = ", ".join(f"{k} {v['cpu_ratio']:.2f}" for k, v in per_group.items())
    peak_listing = ", ".join(f"{k} {v['peak_ratio']:.2f}" for k, v in per_group.items())
    answer = "YES" if ok else "NO"
    if use_cpu:
        measured = (
            f"DDE/DPO CPU time per step {cpu_listing} (decides: process CPU time, steadier than "
            f"wall time on a shared CPU); wall-clock s/step {wall_listing}"
            + (
                ""
                if wall_ok
                else " (above the tolerance: wall time is noisy here, rerun on an idle machine)"
            )
        )
    else:
        measured = f"DDE/DPO s/step {wall_listing}"
    text = (
        f"Verdict: DDE (importance) costs no more than Diffusion-DPO per pair: {answer}. "
        f"Tolerance: ratio <= {limit:.2f} ({tolerance:.0%}). Measured {measured}; "
        f"peak memory {peak_listing}."
    )
    return {
        "text": text,
        "answer": answer,
        "decided_by": "cpu_time" if use_cpu else "wall_time",
        "tolerance": tolerance,
        "ok": ok,
        "wall_ok": wall_ok,
        "peak_ok": peak_ok,
        "per_group": per_group,
    }


def _jsonable(rows: dict[tuple[str, str, str, str], dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for (model, finetune, scheme, mode), a in rows.items():
        out.append({"model": model, "finetune": finetune, "scheme": scheme, "mode": mode, **a})
    return out


def _clean(obj: Any) -> Any:
    """NaN/inf -> None, so the JSON is standard."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.train_step",
        description="Seconds per optimizer step, pairs/s and peak memory: DDE vs Diffusion-DPO.",
    )
    p.add_argument(
        "--quick", action="store_true", help="fewer steps and one round (< 2 min on 2 cores)"
    )
    p.add_argument(
        "--steps", type=int, default=None, help="timed steps per run (default 8; --quick 2)"
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed warm-up steps per run, >= 1 (default 2; --quick 1)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="runs of each configuration, in alternating order (default 2; --quick 1)",
    )
    p.add_argument(
        "--batch-size", type=int, default=8, help="preference pairs per optimizer step (default 8)"
    )
    p.add_argument(
        "--pairs", type=int, default=32, help="distinct pairs in the data set (default 32)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads for the CPU rows (default 1: on 2 shared cores more threads "
        "oversubscribe; 0 = torch's default)",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=0.10,
        help="allowed DDE/DPO cost ratio above 1 (default 0.10)",
    )
    p.add_argument("--seed", type=int, default=0, help="TrainConfig.seed (same for every row)")
    p.add_argument(
        "--gpu-sd15",
        action="store_true",
        help="also the full-size SD1.5 UNet on CUDA (skipped without a GPU)",
    )
    p.add_argument(
        "--gpu-steps",
        type=int,
        default=None,
        help="timed steps of the SD1.5 runs (default 10; --quick 5)",
    )
    p.add_argument(
        "--gpu-batch-size", type=int, default=8, help="pairs per step of the SD1.5 runs (default 8)"
    )
    p.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="SD1.5 runs with gradient checkpointing",
    )
    p.add_argument(
        "--cache-compare",
        action="store_true",
        help="also the encode cache before/after table: tiny SD (and the SD1.5 UNet with "
        "--gpu-sd15 on CUDA) trained with encode_cache off and on, side by side",
    )
    p.add_argument(
        "--cache-only",
        action="store_true",
        help="only the encode cache table (implies --cache-compare; skips the DDE/DPO table)",
    )
    p.add_argument(
        "--cache-methods",
        choices=["default", "all"],
        default="default",
        help="schemes of the cache table: the product's default (dde/importance) or all three",
    )
    p.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})"
    )
    args = p.parse_args(argv)
    args.steps = args.steps if args.steps is not None else (2 if args.quick else 8)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.rounds = args.rounds if args.rounds is not None else (1 if args.quick else 2)
    args.gpu_steps = args.gpu_steps if args.gpu_steps is not None else (5 if args.quick else 10)
    args.cache_compare = args.cache_compare or args.cache_only
    for name in ("steps", "warmup", "rounds", "batch_size", "pairs", "gpu_steps", "gpu_batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.threads < 0 or args.tolerance < 0:
        p.error("--threads and --tolerance must be >= 0")
    return args


def _print_main(
    rows: dict[tuple[str, str, str, str], dict[str, Any]],
    args: argparse.Namespace,
    env: dict[str, Any],
    device_note: str,
    result: dict[str, Any],
) -> None:
    """Prints the DDE vs Diffusion-DPO table and verdict; adds them to ``result``."""
    _add_ratios(rows)
    builtin_note = (
        "trained checkpoint (worker/shapes/checkpoint/)"
        if env["builtin_checkpoint"]
        else "RANDOM weights: worker/shapes/checkpoint/ is absent, built from BuiltinConfig "
        "(step cost does not depend on the weights)"
    )
    print()
    print(
        f"Training step cost, DDE vs Diffusion-DPO (real trainer: worker.alignment.trainer.train). "
        f"{args.batch_size} pairs/step, seed {args.seed}, same data for every row; median over "
        f"{args.steps} timed steps x {args.rounds} round(s) after {args.warmup} warm-up step(s); "
        f"LoRA r={LORA_RANK}; {device_note}."
    )
    print(f"builtin:shapes weights: {builtin_note}.")
    print(
        "tiny-sd: tiny SD1.5-architecture pipeline built from configs, saved, loaded by load_backbone."
    )
    peak_kind = next(iter(rows.values()))["peak_kind"]
    print(
        f"peak MB: {peak_kind} of the configuration's own process"
        + (" (includes ~0.3-0.5 GB of imported libraries)." if peak_kind == "ru_maxrss" else ".")
    )
    print()
    print(_table(rows))
    spreads = [a["round_spread"] for a in rows.values() if a["round_spread"] is not None]
    cpu_spreads = [
        a["cpu_round_spread"] for a in rows.values() if a["cpu_round_spread"] is not None
    ]
    if spreads:
        print(
            f"noise: one configuration's per-round medians differ by up to {max(spreads):.0%} in "
            f"wall time" + (f", {max(cpu_spreads):.0%} in CPU time." if cpu_spreads else ".")
        )
    verdict = _verdict(rows, args.tolerance)
    print(verdict["text"])
    result["rows"] = _jsonable(rows)
    result["verdict"] = verdict
    result["builtin_weights"] = builtin_note


def _print_cache(
    rows: dict[CacheKey, dict[str, Any]],
    args: argparse.Namespace,
    device_note: str,
    result: dict[str, Any],
) -> None:
    """Prints the encode cache before/after table; adds it to ``result``."""
    print()
    print(
        f"Encode cache, before (off: the VAE and the text encoder run at every step) and after "
        f"(on: latent distributions and prompt embeddings encoded once per run, latents sampled "
        f"per step). {args.batch_size} pairs/step, {args.pairs} pairs, median over "
        f"{args.steps} timed steps x {args.rounds} round(s) after {args.warmup} warm-up "
        f"step(s); LoRA r={LORA_RANK}; {device_note}. speedup = pairs/s after / before; "
        f"run pairs/s = pairs trained / wall time of the whole train() call (setup, cache "
        f"build, warm-up included)."
    )
    print()
    print(_cache_table(rows))
    spreads = [a["round_spread"] for a in rows.values() if a["round_spread"] is not None]
    if spreads:
        print(
            f"noise: one configuration's per-round medians differ by up to {max(spreads):.0%} "
            "in wall time."
        )
    result["encode_cache_rows"] = _jsonable_cache(rows)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    started = time.perf_counter()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)

    print(
        "bench.train_step: starting the fork server (imports torch, diffusers, transformers)...",
        file=sys.stderr,
        flush=True,
    )
    env = _call(ctx, _child_env, None)
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(
        f"  ready after {time.perf_counter() - started:.1f} s; torch {env['torch']}, "
        f"cuda={env['cuda']}",
        file=sys.stderr,
        flush=True,
    )

    base = {
        "steps": args.steps,
        "warmup": args.warmup,
        "batch_size": args.batch_size,
        "n_pairs": max(args.pairs, args.batch_size),
        "data_seed": 1234,
        "seed": args.seed,
        "threads": 0 if env["cuda"] else args.threads,
    }
    result: dict[str, Any] = {
        "command": "python -m bench.train_step " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": {
            **env,
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "loadavg_start": load_start,
        },
    }
    with tempfile.TemporaryDirectory(prefix="bench-tiny-sd-") as tmp:
        tiny = _call(ctx, _child_build_tiny_sd, str(Path(tmp) / "pipeline"))
        base["tiny_sd_path"] = tiny["path"]
        # one unreported run first, so that no measured row pays for faulting in the libraries'
        # code and the data files (the first row of a group would otherwise be a little slower)
        _call(
            ctx,
            _child_measure,
            {
                **base,
                "model": "tiny-sd",
                "finetune": "lora",
                "scheme": "uniform",
                "mode": "importance",
                "steps": 1,
                "warmup": 1,
            },
        )
        rows = {} if args.cache_only else _run_rows(ctx, GROUPS, base, args.rounds)
        cache_methods = METHODS if args.cache_methods == "all" else METHODS[:1]
        cache_rows = (
            _run_cache_rows(ctx, CACHE_GROUPS, cache_methods, base, args.rounds)
            if args.cache_compare
            else {}
        )
    device_note = (
        f"CUDA ({env.get('gpu_name')})"
        if env["cuda"]
        else (
            f"CPU, {base['threads'] or env['torch_default_threads']} torch thread(s), "
            f"{os.cpu_count()} cores"
        )
    )
    if rows:
        _print_main(rows, args, env, device_note, result)
    if cache_rows:
        _print_cache(cache_rows, args, device_note, result)

    # ------------------------------------------------------------------ SD1.5 on a GPU
    if args.gpu_sd15:
        print()
        if not env["cuda"]:
            line = (
                "GPU SD1.5 part skipped: no CUDA GPU is present on this machine "
                "(not an error; run with --gpu-sd15 on a GPU machine)."
            )
            print(line)
            result["gpu_sd15"] = {"skipped": True, "reason": "no CUDA device"}
        else:
            gpu_base = {
                **base,
                "steps": args.gpu_steps,
                "warmup": max(args.warmup, 3),
                "batch_size": args.gpu_batch_size,
                "n_pairs": max(2 * args.gpu_batch_size, 16),
                "mixed_precision": "bf16",
                "gradient_checkpointing": bool(args.gradient_checkpointing),
            }
            print(
                f"Full-size SD1.5 UNet (860M, random weights) + SD1.5-sized VAE and CLIP-L-sized "
                f"text encoder (random), 512x512, {args.gpu_batch_size} pairs/step, LoRA "
                f"r={LORA_RANK}, bf16, gradient checkpointing "
                f"{'on' if args.gradient_checkpointing else 'off'}, {env.get('gpu_name')}:"
            )
            result["gpu_sd15"] = {"skipped": False}
            if not args.cache_only:
                gpu_rows = _run_rows(ctx, [("sd15", "lora")], gpu_base, 1)
                _add_ratios(gpu_rows)
                print(_table(gpu_rows))
                gv = _verdict(gpu_rows, args.tolerance)
                print(gv["text"])
                result["gpu_sd15"].update(rows=_jsonable(gpu_rows), verdict=gv)
            if args.cache_compare:
                gpu_cache = _run_cache_rows(ctx, [("sd15", "lora")], METHODS[:1], gpu_base, 1)
                print("encode cache, before and after:")
                print(_cache_table(gpu_cache))
                result["gpu_sd15"]["encode_cache_rows"] = _jsonable_cache(gpu_cache)

    result["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    result["total_seconds"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(_clean(result), indent=2) + "\n")
    print(f"\nfigures written to {args.out} (total {result['total_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
