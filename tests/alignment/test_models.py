"""Loading SD / SDXL through from_pretrained, LoRA, the adapter-disabled reference, adapter files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from worker.alignment import adapters
from worker.alignment.adapters import (
    AdapterLoadError,
    adapter_state_dict,
    adapters_disabled,
    add_lora,
    file_sha256,
    fuse_adapter,
    has_adapter,
    load_adapter,
    load_full_weights,
    prepare_full_finetune,
    read_adapter_file,
    save_adapter,
    save_full_weights,
    verify_adapter_loaded,
)
from worker.alignment.models import (
    ModelNotFoundError,
    UnsupportedModelError,
    load_backbone,
)


def _inputs(backbone, n: int = 2):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(
        (n, backbone.latent_channels, backbone.latent_size, backbone.latent_size), generator=gen
    )
    t = torch.tensor([100, 700][:n])
    return x, t, backbone.encode_prompts(["a red circle", "a blue square"][:n])


def _perturb_adapter(unet, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


# ------------------------------------------------------------------------------- loading
def test_load_tiny_sd_through_from_pretrained(tiny_sd):
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    bb = tiny_sd
    assert bb.kind == "sd"
    assert bb.extra["pipeline_class"] == "StableDiffusionPipeline"
    assert isinstance(bb.scheduler, DDPMScheduler)  # the pipeline's DDIM replaced for training
    assert type(bb.extra["sampling_scheduler"]).__name__ == "DDIMScheduler"
    assert bb.resolution == 64 and bb.latent_size == 32
    # same noise schedule as the checkpoint's own scheduler
    pipe = StableDiffusionPipeline.from_pretrained(bb.extra["source"], local_files_only=True)
    torch.testing.assert_close(bb.alphas_cumprod, pipe.scheduler.alphas_cumprod.double())
    # everything is frozen until a LoRA or a full fine-tune makes part of the UNet trainable
    assert not any(p.requires_grad for m in bb.modules() for p in m.parameters())
    x, t, cond = _inputs(bb)
    assert bb.predict_noise(x, t, cond).shape == x.shape


def test_load_tiny_sdxl_detects_kind_and_conditions(tiny_sdxl):
    bb = tiny_sdxl
    assert bb.kind == "sdxl"
    assert bb.text_encoder_2 is not None and bb.tokenizer_2 is not None
    assert type(bb.extra["sampling_scheduler"]).__name__ == "EulerDiscreteScheduler"
    x, t, cond = _inputs(bb)
    assert cond.encoder_hidden_states.shape == (2, 32, 64)  # two encoders' 32 dims concatenated
    assert cond.added_cond_kwargs["text_embeds"].shape == (2, 32)
    assert cond.added_cond_kwargs["time_ids"].shape == (2, 6)
    assert bb.predict_noise(x, t, cond).shape == x.shape


def test_load_backbone_errors_are_clear(tiny_sd_path, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="no model directory"):
        load_backbone(tmp_path / "does-not-exist")
    with pytest.raises(ModelNotFoundError, match="prefloop-tests/not-a-model"):
        load_backbone("prefloop-tests/not-a-model")  # a hub id, absent from the offline cache
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="model_index.json"):
        load_backbone(tmp_path / "empty")
    with pytest.raises(UnsupportedModelError, match="kind='sdxl'"):
        load_backbone(tiny_sd_path, kind="sdxl")


def test_load_backbone_dtype_and_resolution(tiny_sd_path):
    bb = load_backbone(str(tiny_sd_path), dtype="bf16", resolution=32, local_files_only=True)
    assert bb.dtype == torch.bfloat16 and bb.resolution == 32
    with pytest.raises(ValueError, match="resolution"):
        load_backbone(tiny_sd_path, resolution=33, local_files_only=True)


def test_full_size_unet_configs_have_the_published_parameter_counts():
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from worker.alignment.tiny_models import sd15_unet_config, sdxl_unet_config

    with init_empty_weights():
        sd15 = UNet2DConditionModel.from_config(sd15_unet_config())
        sdxl = UNet2DConditionModel.from_config(sdxl_unet_config())
    assert sum(p.numel() for p in sd15.parameters()) == 859_520_964
    assert sum(p.numel() for p in sdxl.parameters()) == 2_567_463_684


# ------------------------------------------------------------------------------- LoRA
def test_add_lora_leaves_only_adapter_trainable(tiny_sd):
    params = add_lora(tiny_sd, rank=4)
    unet = tiny_sd.unet
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert len(trainable) == len(params)
    assert {id(p) for p in params} == {id(p) for p in unet.parameters() if p.requires_grad}
    assert not any(p.requires_grad for p in tiny_sd.vae.parameters())
    with pytest.raises(ValueError, match="already has an adapter"):
        add_lora(tiny_sd, rank=4)


def test_adapters_disabled_is_the_base_model_and_reenables_on_error(tiny_sd_path):
    base = load_backbone(tiny_sd_path, local_files_only=True)
    bb = load_backbone(tiny_sd_path, local_files_only=True)
    add_lora(bb, rank=4)
    _perturb_adapter(bb.unet)
    x, t, cond = _inputs(bb)
    with torch.no_grad():
        base_out = base.predict_noise(x, t, cond)
        adapted = bb.predict_noise(x, t, cond)
        assert not torch.equal(adapted, base_out)
        with adapters_disabled(bb.unet):
            torch.testing.assert_close(bb.predict_noise(x, t, cond), base_out, rtol=0, atol=0)
        torch.testing.assert_close(bb.predict_noise(x, t, cond), adapted, rtol=0, atol=0)

        with pytest.raises(RuntimeError, match="boom"):
            with adapters_disabled(bb.unet):
                raise RuntimeError("boom")
        # re-enabled after the exception
        torch.testing.assert_close(bb.predict_noise(x, t, cond), adapted, rtol=0, atol=0)


def test_fuse_adapter_keeps_the_adapted_function_and_removes_the_adapter(tiny_pixel):
    # An online round fuses the LoRA trained so far, then trains a fresh one on top: the fused
    # model must compute what the adapted one did, with no adapter layers left.
    add_lora(tiny_pixel, rank=4)
    _perturb_adapter(tiny_pixel.unet)
    x, t, cond = _inputs(tiny_pixel)
    with torch.no_grad():
        with adapters_disabled(tiny_pixel.unet):
            base_out = tiny_pixel.predict_noise(x, t, cond)
        adapted = tiny_pixel.predict_noise(x, t, cond)
        assert (adapted - base_out).abs().max() > 1e-3  # the adapter does change the output
        fuse_adapter(tiny_pixel.unet)
        assert not has_adapter(tiny_pixel.unet)
        assert not any(".lora_" in name for name, _ in tiny_pixel.unet.named_parameters())
        torch.testing.assert_close(
            tiny_pixel.predict_noise(x, t, cond), adapted, rtol=1e-4, atol=1e-5
        )
    with pytest.raises(ValueError, match="no adapter to fuse"):
        fuse_adapter(tiny_pixel.unet)
    add_lora(tiny_pixel, rank=2)  # a fresh adapter goes on top of the fused weights
    assert has_adapter(tiny_pixel.unet)


# ------------------------------------------------------------------------------- adapter files
@pytest.mark.parametrize("which", ["sd", "sdxl"])
def test_adapter_save_load_round_trip_is_exact(which, tiny_sd_path, tiny_sdxl_path, tmp_path):
    path = tiny_sd_path if which == "sd" else tiny_sdxl_path
    src = load_backbone(path, local_files_only=True)
    add_lora(src, rank=4, alpha=8)
    _perturb_adapter(src.unet)
    file = tmp_path / "v1" / "adapter.safetensors"
    sha = save_adapter(src.unet, file, metadata={"version": "v1"})
    assert sha == file_sha256(file)
    tensors, meta = read_adapter_file(file)
    assert all(k.startswith("unet.") for k in tensors)
    assert meta["version"] == "v1" and "lora_adapter_metadata" in meta
    assert sorted(os.listdir(file.parent)) == ["adapter.safetensors"]  # no temp file left

    dst = load_backbone(path, local_files_only=True)
    load_adapter(dst.unet, file)
    saved = adapter_state_dict(src.unet)
    loaded = adapter_state_dict(dst.unet)
    assert saved.keys() == loaded.keys()
    for key in saved:
        assert torch.equal(saved[key], loaded[key]), key
    assert dst.unet.peft_config["default"].lora_alpha == 8
    x, t, cond = _inputs(src)
    with torch.no_grad():
        torch.testing.assert_close(
            dst.predict_noise(x, t, cond), src.predict_noise(x, t, cond), rtol=0, atol=0
        )


def test_adapter_file_loads_with_diffusers_pipeline_api(tiny_sd_path, tmp_path):
    from diffusers import StableDiffusionPipeline

    src = load_backbone(tiny_sd_path, local_files_only=True)
    add_lora(src, rank=4)
    _perturb_adapter(src.unet)
    file = tmp_path / "adapter.safetensors"
    save_adapter(src.unet, file)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path, local_files_only=True)
    pipe.load_lora_weights(str(tmp_path), weight_name=file.name, adapter_name="default")
    verify_adapter_loaded(pipe.unet, file)


def test_prefix_trap_is_caught(tiny_sd_path, tmp_path, monkeypatch):
    src = load_backbone(tiny_sd_path, local_files_only=True)
    add_lora(src, rank=4)
    _perturb_adapter(src.unet)
    file = tmp_path / "adapter.safetensors"
    save_adapter(src.unet, file)

    # The trap itself: without prefix="unet", diffusers loads nothing and only warns.
    dst = load_backbone(tiny_sd_path, local_files_only=True)
    dst.unet.load_lora_adapter(str(tmp_path), weight_name=file.name)
    with pytest.raises(AdapterLoadError, match="nothing was loaded"):
        verify_adapter_loaded(dst.unet, file)

    # load_adapter verifies itself: if the underlying load drops the prefix, it raises.
    dst = load_backbone(tiny_sd_path, local_files_only=True)
    original = type(dst.unet).load_lora_adapter

    def load_without_prefix(self, *args, **kwargs):
        kwargs.pop("prefix", None)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(dst.unet), "load_lora_adapter", load_without_prefix)
    with pytest.raises(AdapterLoadError):
        load_adapter(dst.unet, file)
    monkeypatch.undo()

    # A load that differs in a single value is caught too.
    dst = load_backbone(tiny_sd_path, local_files_only=True)
    load_adapter(dst.unet, file)
    with torch.no_grad():
        next(p for n, p in dst.unet.named_parameters() if ".lora_B" in n).add_(1e-3)
    with pytest.raises(AdapterLoadError, match="differ"):
        verify_adapter_loaded(dst.unet, file)


def test_save_adapter_is_atomic(tiny_sd, tmp_path, monkeypatch):
    add_lora(tiny_sd, rank=4)
    file = tmp_path / "adapter.safetensors"
    first_sha = save_adapter(tiny_sd.unet, file)
    _perturb_adapter(tiny_sd.unet)

    def crash(*args, **kwargs):
        raise OSError("disk died during publish")

    monkeypatch.setattr(adapters.os, "replace", crash)
    with pytest.raises(OSError, match="disk died"):
        save_adapter(tiny_sd.unet, file)
    monkeypatch.undo()
    assert file_sha256(file) == first_sha  # the published file is untouched
    assert sorted(os.listdir(tmp_path)) == ["adapter.safetensors"]  # temp file cleaned up


def test_prepare_full_finetune_keeps_a_frozen_copy(tiny_pixel, tmp_path):
    ref = prepare_full_finetune(tiny_pixel)
    assert ref is not tiny_pixel.unet
    assert all(p.requires_grad for p in tiny_pixel.unet.parameters())
    assert not any(p.requires_grad for p in ref.parameters())
    assert prepare_full_finetune(tiny_pixel) is ref
    with torch.no_grad():
        next(iter(tiny_pixel.unet.parameters())).add_(1.0)
    assert not torch.equal(next(iter(tiny_pixel.unet.parameters())), next(iter(ref.parameters())))

    file = Path(tmp_path) / "unet.safetensors"
    save_full_weights(tiny_pixel.unet, file)
    load_full_weights(ref, file)
    for a, b in zip(tiny_pixel.unet.state_dict().values(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b)
