"""The DDE trainer on tiny SD, SDXL and pixel backbones: what it changes, determinism, resume,
gradient accumulation, the divergence guard, cancellation, and the config's validation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from worker.alignment.adapters import file_sha256, read_adapter_file
from worker.alignment.config import ConfigError, TrainConfig
from worker.alignment.trainer import (
    ADAPTER_FILENAME,
    FULL_WEIGHTS_FILENAME,
    LossSpikeGuard,
    PreferencePair,
    ResumeMismatchError,
    StepMetrics,
    TrainingCancelled,
    TrainingDiverged,
    image_to_tensor,
    latest_checkpoint,
    pair_losses,
    train,
)

from .conftest import make_pairs


def _config(**overrides) -> TrainConfig:
    base = dict(
        steps=1,
        batch_size=2,
        resolution=16,
        learning_rate=1e-3,
        checkpoint_every=0,
        lora_rank=4,
        beta=5000.0,
    )
    base.update(overrides)
    return TrainConfig(**base)


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    return read_adapter_file(path)[0]


# ------------------------------------------------------------------------------ one step
@pytest.mark.parametrize("kind", ["sd", "sdxl", "pixel"])
def test_one_dde_lora_step_changes_only_the_adapter(kind, request, tmp_path):
    bb = request.getfixturevalue(
        {"sd": "tiny_sd", "sdxl": "tiny_sdxl", "pixel": "tiny_pixel"}[kind]
    )
    frozen = {
        f"{i}.{n}": p.detach().clone()
        for i, m in enumerate(bb.modules())
        for n, p in m.named_parameters()
    }
    seen: list[StepMetrics] = []
    # a large lr so that even the first step (lora_B starts at zero) moves the adapter visibly
    result = train(bb, make_pairs(4), _config(), output_dir=tmp_path, progress=seen.append)

    after = {  # peft wraps each adapted Linear: "to_q.weight" becomes "to_q.base_layer.weight"
        f"{i}.{n}".replace(".base_layer", ""): p
        for i, m in enumerate(bb.modules())
        for n, p in m.named_parameters()
    }
    adapter_keys = [k for k in after if ".lora_" in k]
    assert adapter_keys and set(frozen) <= set(after)
    for key, before in frozen.items():  # every base weight (UNet, VAE, text encoders) untouched
        assert torch.equal(after[key], before), key
    assert any(after[k].abs().sum() > 0 for k in adapter_keys if ".lora_B" in k)
    assert not any(p.requires_grad for n, p in bb.unet.named_parameters() if ".lora_" not in n)

    assert result.adapter_path == tmp_path / ADAPTER_FILENAME
    assert result.adapter_sha256 == file_sha256(result.adapter_path)
    saved = _adapter(result.adapter_path)
    assert saved and all(k.startswith("unet.") for k in saved)
    assert result.steps == 1 and len(result.history) == 1 and seen == result.history
    m = result.final
    assert m.step == 1 and m.total_steps == 1 and m.lr == pytest.approx(1e-3)
    # at step 1 the adapter is still zero (lora_B = 0): model == reference
    assert m.loss == pytest.approx(math.log(2), abs=1e-6)
    assert m.model_mse == pytest.approx(m.ref_mse, abs=1e-6)
    assert sum(m.timestep_histogram) == 2 and len(m.timestep_histogram) == 10
    assert all(math.isfinite(v) for v in (m.grad_norm, m.seconds, m.reward_margin))


# ------------------------------------------------------------------------------ reproducibility
def test_same_seed_gives_the_same_adapter(tiny_pixel, tmp_path):
    from worker.alignment.tiny_models import build_tiny_pixel_backbone

    pairs = make_pairs(4)
    cfg = _config(steps=2, batch_size=1, lora_dropout=0.1)
    a = train(tiny_pixel, pairs, cfg, output_dir=tmp_path / "a")
    b = train(build_tiny_pixel_backbone(seed=0), pairs, cfg, output_dir=tmp_path / "b")
    c = train(
        build_tiny_pixel_backbone(seed=0), pairs, cfg.replace(seed=1), output_dir=tmp_path / "c"
    )
    assert a.adapter_sha256 == b.adapter_sha256
    ta, tc = _adapter(a.adapter_path), _adapter(c.adapter_path)
    assert any(not torch.equal(ta[k], tc[k]) for k in ta)
    assert [h.timestep_histogram for h in a.history] == [h.timestep_histogram for h in b.history]


def test_resume_after_a_crash_ends_bit_identical(tiny_sd_path, tmp_path):
    from worker.alignment.models import load_backbone

    def fresh():
        return load_backbone(tiny_sd_path, local_files_only=True)

    # 3 pairs, batch 1: the run crosses an epoch boundary after the resume point; LoRA dropout
    # makes the result depend on the global torch RNG, which the checkpoint must restore.
    pairs = make_pairs(3)
    cfg = _config(steps=4, batch_size=1, checkpoint_every=2, lora_dropout=0.1)
    unbroken = train(fresh(), pairs, cfg, output_dir=tmp_path / "unbroken")

    def crash_at_3(m: StepMetrics) -> None:
        if m.step == 3:
            raise KeyboardInterrupt("worker killed")

    with pytest.raises(KeyboardInterrupt):
        train(fresh(), pairs, cfg, output_dir=tmp_path / "broken", progress=crash_at_3)
    assert latest_checkpoint(tmp_path / "broken").name == "step-000002"
    assert not (tmp_path / "broken" / ADAPTER_FILENAME).exists()

    resumed = train(fresh(), pairs, cfg, output_dir=tmp_path / "broken")
    assert resumed.resumed_from == 2 and resumed.steps == 4
    a, b = _adapter(unbroken.adapter_path), _adapter(resumed.adapter_path)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed.adapter_sha256 == unbroken.adapter_sha256
    strip = lambda h: [{**m.as_dict(), "seconds": 0} for m in h]  # noqa: E731
    assert strip(resumed.history) == strip(unbroken.history)

    # a retried task after completion trains nothing more and republishes the same adapter
    again = train(fresh(), pairs, cfg, output_dir=tmp_path / "broken")
    assert again.resumed_from == 4 and again.adapter_sha256 == unbroken.adapter_sha256


def test_resume_refuses_a_checkpoint_from_other_settings(tiny_pixel, tmp_path):
    from worker.alignment.tiny_models import build_tiny_pixel_backbone

    pairs = make_pairs(2)
    train(tiny_pixel, pairs, _config(checkpoint_every=1), output_dir=tmp_path)
    with pytest.raises(ResumeMismatchError, match="beta"):
        train(
            build_tiny_pixel_backbone(),
            pairs,
            _config(checkpoint_every=1, beta=100.0),
            output_dir=tmp_path,
        )
    with pytest.raises(ResumeMismatchError, match="other pairs"):
        train(
            build_tiny_pixel_backbone(),
            make_pairs(3),
            _config(checkpoint_every=1),
            output_dir=tmp_path,
        )


def test_grad_accumulation_matches_a_bigger_batch(tmp_path):
    from worker.alignment.tiny_models import build_tiny_pixel_backbone

    pairs = make_pairs(4)
    # ε >> sqrt(v) makes Adam's update proportional to the gradient, so float summation-order
    # differences stay relative (with ε = 1e-8, weights whose gradient is ~0 get an update of
    # ±lr from noise, and the comparison would test that noise instead)
    linear_adam = {"adam_epsilon": 1.0, "learning_rate": 0.1}
    accum = train(
        build_tiny_pixel_backbone(),
        pairs,
        _config(steps=2, batch_size=1, grad_accum=2, **linear_adam),
        output_dir=tmp_path / "accum",
    )
    batch = train(
        build_tiny_pixel_backbone(),
        pairs,
        _config(steps=2, batch_size=2, grad_accum=1, **linear_adam),
        output_dir=tmp_path / "batch",
    )
    a, b = _adapter(accum.adapter_path), _adapter(batch.adapter_path)
    # β = 5000 multiplies a difference of two MSEs of ~1, so float32 rounding of the MSEs (which
    # depends on the batch shape) moves the logits by ~1e-4 relative: compare the trained
    # lora_B (zero at init, so it *is* the update) against the size of the update.
    lora_b = [k for k in a if "lora_B" in k]
    update = max(a[k].abs().max().item() for k in lora_b)
    assert update > 1e-3
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-4 * update)
    for ha, hb in zip(accum.history, batch.history, strict=True):
        assert ha.timestep_histogram == hb.timestep_histogram
        assert ha.loss == pytest.approx(hb.loss, abs=2e-3)  # the same β-amplified rounding
        assert ha.grad_norm == pytest.approx(hb.grad_norm, rel=2e-3)


def test_gradient_checkpointing_gives_the_same_step(tmp_path):
    from worker.alignment.tiny_models import build_tiny_pixel_backbone

    pairs = make_pairs(2)
    plain = train(build_tiny_pixel_backbone(), pairs, _config(), output_dir=tmp_path / "a")
    ckpt = train(
        build_tiny_pixel_backbone(),
        pairs,
        _config(gradient_checkpointing=True),
        output_dir=tmp_path / "b",
    )
    a, b = _adapter(plain.adapter_path), _adapter(ckpt.adapter_path)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------ other modes
def test_full_finetune_trains_the_unet_against_a_frozen_copy(tiny_pixel, tmp_path):
    before = {n: p.detach().clone() for n, p in tiny_pixel.unet.named_parameters()}
    result = train(
        tiny_pixel, make_pairs(2), _config(finetune="full", learning_rate=1e-4), output_dir=tmp_path
    )
    assert result.adapter_path == tmp_path / FULL_WEIGHTS_FILENAME
    ref = tiny_pixel.extra["reference_unet"]
    changed = [n for n, p in tiny_pixel.unet.named_parameters() if not torch.equal(p, before[n])]
    assert changed
    for n, p in ref.named_parameters():
        assert torch.equal(p, before[n]), n
    saved = _adapter(result.adapter_path)
    assert torch.equal(saved[changed[0]], dict(tiny_pixel.unet.named_parameters())[changed[0]])


def test_weighted_mode_with_ties_and_uniform_scheme_run(tiny_pixel, tmp_path):
    pairs = make_pairs(3)
    pairs[0] = PreferencePair(pairs[0].prompt, pairs[0].winner, pairs[0].loser, tie=True)
    result = train(
        tiny_pixel,
        pairs,
        _config(steps=2, scheme="uniform", timestep_mode="weighted", include_ties=True),
        output_dir=tmp_path,
    )
    assert result.pairs_used == 3 and all(math.isfinite(m.loss) for m in result.history)
    ties_only = [PreferencePair("x", pairs[0].winner, pairs[0].loser, tie=True)]
    with pytest.raises(ValueError, match="1 ties dropped"):
        train(tiny_pixel, ties_only, _config(), output_dir=tmp_path / "ties")


def test_pair_losses_handle_ties_symmetrically():
    # winners first: m_w = 1, m_l = 2, r_w = r_l = 1.5 -> z = -(β/2)(Δθ - Δref) = 1 for β = 2
    model = torch.tensor([1.0, 1.0, 2.0, 2.0])
    ref = torch.tensor([1.5, 1.5, 1.5, 1.5])
    loss, out = pair_losses(model, ref, beta=2.0, ties=torch.tensor([False, True]))
    decided = -math.log(1 / (1 + math.exp(-1.0)))  # -log σ(1) = 0.313262
    tied = 0.5 * (decided - math.log(1 / (1 + math.exp(1.0))))  # 0.5 (-log σ(1) - log σ(-1))
    assert out.per_sample_loss[0].item() == pytest.approx(0.313262, abs=1e-6)
    assert loss.item() == pytest.approx((decided + tied) / 2, abs=1e-6)


# ------------------------------------------------------------------------------ safety
def test_nan_guard_stops_the_run_and_leaves_no_adapter(tiny_pixel, tmp_path):
    stale = tmp_path / ADAPTER_FILENAME
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"an adapter from an earlier attempt")
    calls = {"n": 0}

    def poison(module, args, output):
        calls["n"] += 1
        if calls["n"] > 2:  # step 1 = reference + policy forward; step 2 goes NaN
            output.sample.fill_(float("nan"))
        return output

    tiny_pixel.unet.register_forward_hook(poison)
    with pytest.raises(TrainingDiverged) as info:
        train(tiny_pixel, make_pairs(4), _config(steps=5, checkpoint_every=1), output_dir=tmp_path)
    assert info.value.step == 2 and "non-finite loss" in info.value.reason
    assert not stale.exists() and not (tmp_path / FULL_WEIGHTS_FILENAME).exists()
    # the only checkpoint is the healthy step-1 one
    assert latest_checkpoint(tmp_path).name == "step-000001"


def test_huge_learning_rate_is_caught(tiny_pixel, tmp_path):
    with pytest.raises(TrainingDiverged) as info:
        train(tiny_pixel, make_pairs(2), _config(steps=4, learning_rate=1e30), output_dir=tmp_path)
    assert info.value.step >= 2
    assert not (tmp_path / ADAPTER_FILENAME).exists()


def test_loss_spike_guard():
    guard = LossSpikeGuard(factor=4.0, window=5, min_history=3, max_consecutive=2)
    for loss in (0.7, 0.6, 0.65):
        assert guard.observe(loss) is None
    assert guard.observe(3.0) is None  # one spike (median 0.65, 3.0 > 2.6): tolerated
    assert guard.observe(0.6) is None  # back to normal resets the count
    assert guard.observe(5.0) is None
    reason = guard.observe(5.0)
    assert reason is not None and "2 consecutive" in reason
    assert 5.0 not in guard.recent  # spikes do not raise the median
    off = LossSpikeGuard(factor=None, window=5, min_history=1, max_consecutive=1)
    assert all(off.observe(x) is None for x in (0.1, 100.0, 1e6))


def test_loss_ceiling_catches_a_run_bad_from_the_start():
    # no spike ever (the loss is flat), but it sits far above ln 2 from the first step
    guard = LossSpikeGuard(factor=4.0, window=5, min_history=3, max_consecutive=2, ceiling=1.5)
    assert guard.observe(2.0) is None
    assert guard.observe(2.1) is None  # fewer than min_history losses: no verdict yet
    reason = guard.observe(2.0)
    assert reason is not None and "median loss 2" in reason and "lower the learning rate" in reason
    # a run around ln 2, or one that improves, never trips it; the median, not one bad step
    ok = LossSpikeGuard(factor=None, window=5, min_history=3, max_consecutive=2, ceiling=1.5)
    assert all(ok.observe(x) is None for x in (0.69, 0.7, 3.0, 0.6, 0.5, 0.4))
    # right at the ceiling is not above it
    edge = LossSpikeGuard(factor=None, window=3, min_history=3, max_consecutive=2, ceiling=1.5)
    assert all(edge.observe(x) is None for x in (1.5, 1.5, 1.5, 1.5))


def test_max_median_loss_is_validated():
    with pytest.raises(ConfigError, match="max_median_loss"):
        TrainConfig(max_median_loss=0.5)  # below the starting value ln 2: every run would stop
    assert TrainConfig(max_median_loss=None).max_median_loss is None
    assert LossSpikeGuard.from_config(TrainConfig(max_median_loss=2.5)).ceiling == 2.5


def test_should_stop_cancels_cleanly(tiny_pixel, tmp_path):
    seen: list[int] = []
    with pytest.raises(TrainingCancelled) as info:
        train(
            tiny_pixel,
            make_pairs(2),
            _config(steps=5),
            output_dir=tmp_path,
            progress=lambda m: seen.append(m.step),
            should_stop=lambda: len(seen) >= 1,
        )
    assert info.value.step == 1 and seen == [1]
    assert not (tmp_path / ADAPTER_FILENAME).exists()


# ------------------------------------------------------------------------------ inputs
def test_image_to_tensor_accepts_arrays_pil_and_tensors():
    from PIL import Image

    arr = np.zeros((20, 30, 3), dtype=np.uint8)
    arr[:, :, 0] = 255
    x = image_to_tensor(arr, 16)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert torch.allclose(x[0], torch.ones(16, 16)) and torch.allclose(x[1], -torch.ones(16, 16))
    torch.testing.assert_close(image_to_tensor(Image.fromarray(arr), 16), x)
    t = torch.full((3, 16, 16), 0.5)
    torch.testing.assert_close(image_to_tensor(t, 16), t)
    with pytest.raises(ValueError, match="uint8"):
        image_to_tensor(arr.astype(np.float32), 16)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        image_to_tensor(torch.full((3, 8, 8), 2.0), 8)


# ------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("scheme", "ddee", "dde"),
        ("timestep_mode", "random", "importance"),
        ("beta", 0.0, "> 0"),
        ("beta", float("nan"), "finite"),
        ("learning_rate", -1e-5, "> 0"),
        ("steps", 0, ">= 1"),
        ("steps", 1.5, "integer"),
        ("batch_size", True, "integer"),
        ("grad_accum", 0, ">= 1"),
        ("finetune", "qlora", "lora"),
        ("mixed_precision", "fp8", "bf16"),
        ("gradient_checkpointing", "yes", "true or false"),
        ("adam_beta2", 1.0, "< 1"),
        ("max_grad_norm", 0.0, "> 0"),
        ("lora_target_modules", (), "non-empty"),
        ("loss_spike_factor", 0.5, "> 1"),
        ("spike_min_history", 100, "spike_window"),
        ("tau_halfwidth", -1.0, ">= 0"),
    ],
)
def test_config_errors_name_the_field(field, value, message):
    with pytest.raises(ConfigError, match=message) as info:
        TrainConfig(**{field: value})
    assert info.value.field == field
    assert f"TrainConfig.{field}" in str(info.value)


def test_config_round_trips_and_rejects_unknown_keys():
    cfg = TrainConfig(scheme="uniform", beta=2500, lora_target_modules=["to_q", "to_v"])
    assert cfg.beta == 2500.0 and isinstance(cfg.beta, float)
    assert cfg.lora_target_modules == ("to_q", "to_v")
    data = cfg.to_dict()
    assert data["lora_target_modules"] == ["to_q", "to_v"]
    assert TrainConfig.from_dict(data) == cfg
    with pytest.raises(ConfigError, match="unknown setting") as info:
        TrainConfig.from_dict({"beta": 5000, "betta": 1})
    assert info.value.field == "betta"
    defaults = TrainConfig()
    assert defaults.scheme == "dde" and defaults.beta == 5000.0 and defaults.include_ties is False
    assert all(f.metadata.get("help") for f in __import__("dataclasses").fields(TrainConfig))


def test_bf16_mixed_precision_keeps_the_adapter_in_fp32(tiny_pixel, tmp_path):
    from worker.alignment.tiny_models import build_tiny_pixel_backbone

    base_before = {n: p.detach().clone() for n, p in tiny_pixel.unet.named_parameters()}
    result = train(
        tiny_pixel, make_pairs(2), _config(mixed_precision="bf16"), output_dir=tmp_path / "bf16"
    )
    assert math.isfinite(result.final.loss)
    for name, p in tiny_pixel.unet.named_parameters():
        if ".lora_" in name:
            assert p.dtype == torch.float32, name
        else:  # frozen base cast to the compute dtype, values otherwise untouched
            assert p.dtype == torch.bfloat16, name
            key = name.replace(".base_layer", "")
            assert torch.equal(p, base_before[key].to(torch.bfloat16)), name
    assert tiny_pixel.text_encoder.dtype == torch.bfloat16
    # accelerate's process-wide state is reset per run: a full-precision run can follow
    again = train(
        build_tiny_pixel_backbone(), make_pairs(2), _config(), output_dir=tmp_path / "fp32"
    )
    assert math.isfinite(again.final.loss)
