"""The encode cache (worker.alignment.encode_cache): a run with it is the run without it, a
resumed run reuses it, a changed snapshot or model rebuilds it; and the torch defaults the
trainer picks (SDPA attention, fused AdamW on CUDA only)."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from worker.alignment.adapters import read_adapter_file
from worker.alignment.config import TrainConfig
from worker.alignment.data import PairDataset, PreferencePair, collate
from worker.alignment.encode_cache import CACHE_DIRNAME, cache_key, load_or_build
from worker.alignment.trainer import (
    StepMetrics,
    adamw_implementation,
    latest_checkpoint,
    train,
    use_sdpa,
)

from .conftest import make_pairs

CPU = torch.device("cpu")


def _config(**overrides) -> TrainConfig:
    base = dict(
        steps=3,
        batch_size=2,
        resolution=16,
        learning_rate=1e-3,
        checkpoint_every=0,
        lora_rank=4,
        lora_dropout=0.1,  # the global torch RNG matters too: it must be consumed alike
        beta=5000.0,
    )
    base.update(overrides)
    return TrainConfig(**base)


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    return read_adapter_file(path)[0]


def _cache_files(output_dir: Path) -> list[Path]:
    return sorted((output_dir / CACHE_DIRNAME).glob("*.safetensors"))


class _Calls:
    """Counts forward passes of the frozen encoders."""

    def __init__(self, bb) -> None:
        self.vae = 0
        self.text = 0
        original = bb.vae.encode

        def encode(*args, **kwargs):
            self.vae += 1
            return original(*args, **kwargs)

        bb.vae.encode = encode
        bb.text_encoder.register_forward_hook(lambda *_: setattr(self, "text", self.text + 1))


def _assert_same_run(a, b) -> None:
    wa, wb = _adapter(a.adapter_path), _adapter(b.adapter_path)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=1e-5)
    assert len(a.history) == len(b.history)
    for ha, hb in zip(a.history, b.history, strict=True):
        assert ha.timestep_histogram == hb.timestep_histogram
        assert ha.loss == pytest.approx(hb.loss, abs=1e-5)
        assert ha.model_mse == pytest.approx(hb.model_mse, rel=1e-5)
        assert ha.ref_mse == pytest.approx(hb.ref_mse, rel=1e-5)


# ------------------------------------------------------------------------------ equivalence
def test_a_cached_run_equals_the_uncached_run(tiny_sd_path, tmp_path):
    from worker.alignment.models import load_backbone

    # 3 pairs, batch 2: the epoch boundary falls inside a batch, so the cache's rows are read
    # in another grouping than the one they were encoded in
    pairs = make_pairs(3)
    plain_bb = load_backbone(tiny_sd_path, local_files_only=True)
    calls = _Calls(plain_bb)
    plain = train(plain_bb, pairs, _config(), output_dir=tmp_path / "plain", encode_cache=False)
    assert calls.vae == 3 and calls.text == 3  # the VAE and the text encoder ran at every step
    assert not (tmp_path / "plain" / CACHE_DIRNAME).exists()

    cached_bb = load_backbone(tiny_sd_path, local_files_only=True)
    calls = _Calls(cached_bb)
    cached = train(cached_bb, pairs, _config(), output_dir=tmp_path / "cached")
    assert calls.vae == 2 and calls.text == 1  # once each, at the start (batches of 4 images)
    assert len(_cache_files(tmp_path / "cached")) == 1
    _assert_same_run(plain, cached)


def test_the_pixel_model_caches_prompts_only(tiny_pixel, tmp_path):
    from worker.alignment.tiny_models import build_tiny_pixel_backbone

    pairs = make_pairs(3)
    plain = train(
        build_tiny_pixel_backbone(seed=0, resolution=16),
        pairs,
        _config(steps=2),
        output_dir=tmp_path / "plain",
        encode_cache=False,
    )
    cached = train(tiny_pixel, pairs, _config(steps=2), output_dir=tmp_path / "cached")
    _assert_same_run(plain, cached)
    [file] = _cache_files(tmp_path / "cached")
    data = load_file(file)
    assert "latent_mean" not in data and data["hidden"].shape[0] == 3


# ------------------------------------------------------------------------------ resume
def test_a_resumed_run_reuses_the_cache(tiny_sd_path, tmp_path):
    from worker.alignment.models import load_backbone

    pairs = make_pairs(3)
    cfg = _config(steps=4, batch_size=1, checkpoint_every=2)
    unbroken = train(
        load_backbone(tiny_sd_path, local_files_only=True), pairs, cfg, output_dir=tmp_path / "a"
    )

    def crash_at_3(m: StepMetrics) -> None:
        if m.step == 3:
            raise KeyboardInterrupt("worker killed")

    out = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        train(
            load_backbone(tiny_sd_path, local_files_only=True),
            pairs,
            cfg,
            output_dir=out,
            progress=crash_at_3,
        )
    assert latest_checkpoint(out).name == "step-000002"
    [file] = _cache_files(out)
    written = file.stat().st_mtime_ns

    bb = load_backbone(tiny_sd_path, local_files_only=True)
    calls = _Calls(bb)
    resumed = train(bb, pairs, cfg, output_dir=out)
    assert resumed.resumed_from == 2
    assert calls.vae == 0 and calls.text == 0  # nothing encoded: the cache was read
    assert _cache_files(out) == [file] and file.stat().st_mtime_ns == written
    assert resumed.adapter_sha256 == unbroken.adapter_sha256


def test_a_stop_while_the_cache_is_built_cancels_the_run(tiny_sd, tmp_path):
    from worker.alignment.trainer import ADAPTER_FILENAME, TrainingCancelled

    answers = iter([True])  # True once, while the cache is built; False after that

    with pytest.raises(TrainingCancelled) as info:
        train(
            tiny_sd,
            make_pairs(3),
            _config(),
            output_dir=tmp_path,
            should_stop=lambda: next(answers, False),
        )
    assert info.value.step == 0
    assert not (tmp_path / ADAPTER_FILENAME).exists() and not _cache_files(tmp_path)


# ------------------------------------------------------------------------------ invalidation
def test_a_changed_snapshot_rebuilds_the_cache(tiny_sd_path, tmp_path):
    """Same prompts (so the checkpoint's data fingerprint matches), one winner image changed:
    the cache is another file, encoded anew, and the run equals an uncached run on the new
    images."""
    from worker.alignment.models import load_backbone

    pairs = make_pairs(3)
    out = tmp_path / "round"
    train(load_backbone(tiny_sd_path, local_files_only=True), pairs, _config(), output_dir=out)
    [old] = _cache_files(out)

    changed = list(pairs)
    changed[1] = PreferencePair(
        changed[1].prompt, np.full((16, 16, 3), 200, np.uint8), changed[1].loser
    )
    bb = load_backbone(tiny_sd_path, local_files_only=True)
    calls = _Calls(bb)
    rebuilt = train(bb, changed, _config(), output_dir=out)
    assert calls.vae > 0
    [new] = _cache_files(out)
    assert new.name != old.name and not old.exists()

    plain = train(
        load_backbone(tiny_sd_path, local_files_only=True),
        changed,
        _config(),
        output_dir=tmp_path / "plain",
        encode_cache=False,
    )
    _assert_same_run(plain, rebuilt)


def test_the_key_follows_the_model_and_the_data(tiny_sd, tiny_sd_path):
    from worker.alignment.models import load_backbone

    pairs = make_pairs(2)
    key = cache_key(tiny_sd, pairs, 16, CPU)
    assert key == cache_key(load_backbone(tiny_sd_path, local_files_only=True), pairs, 16, CPU)
    assert key != cache_key(tiny_sd, pairs, 32, CPU)  # resolution
    assert key != cache_key(tiny_sd, pairs[::-1], 16, CPU)  # order of the pairs
    renamed = [PreferencePair("another prompt", pairs[0].winner, pairs[0].loser), pairs[1]]
    assert key != cache_key(tiny_sd, renamed, 16, CPU)
    other_vae = load_backbone(tiny_sd_path, local_files_only=True)
    with torch.no_grad():  # another snapshot of the model under the same name
        next(other_vae.vae.parameters()).add_(0.01)
    assert key != cache_key(other_vae, pairs, 16, CPU)
    assert len(key) == 32


def test_an_unreadable_file_is_rebuilt_and_write_false_writes_nothing(tiny_sd, tmp_path):
    pairs = make_pairs(2)
    key = cache_key(tiny_sd, pairs, 16, CPU)
    directory = tmp_path / CACHE_DIRNAME

    in_memory = load_or_build(
        tiny_sd, pairs, resolution=16, directory=directory, device=CPU, write=False
    )
    assert not directory.exists() and not in_memory.reused

    directory.mkdir()
    (directory / f"{key}.safetensors").write_bytes(b"half a file")  # e.g. a crash without fsync
    built = load_or_build(tiny_sd, pairs, resolution=16, directory=directory, device=CPU)
    assert not built.reused
    again = load_or_build(tiny_sd, pairs, resolution=16, directory=directory, device=CPU)
    assert again.reused
    for a, b in ((in_memory, again), (built, again)):
        for x, y in zip(a.latent_distribution([1, 0]), b.latent_distribution([1, 0]), strict=True):
            assert x.shape == (4, 4, 8, 8) and torch.equal(x, y)
        prompts = [p.prompt for p in pairs]
        assert torch.equal(
            a.conditioning(prompts, CPU).encoder_hidden_states,
            b.conditioning(prompts, CPU).encoder_hidden_states,
        )
    # the rows read back are the rows encoded: pair 1's winner is row 2 of the file
    mean, _ = again.latent_distribution([1])
    assert torch.equal(mean[0], load_file(again.path)["latent_mean"][2])
    # a non-main process finds the file and reads it instead of encoding
    assert load_or_build(
        tiny_sd, pairs, resolution=16, directory=directory, device=CPU, write=False
    ).reused

    stopped = load_or_build(
        tiny_sd,
        make_pairs(3),
        resolution=16,
        directory=tmp_path / "stopped",
        device=CPU,
        should_stop=lambda: True,
    )
    assert stopped is None and not (tmp_path / "stopped").exists()


def test_the_dataset_leaves_images_out_when_the_cache_has_them():
    pairs = make_pairs(2)
    with_images = collate([PairDataset(pairs, 16)[(1, 7)]])
    without = collate([PairDataset(pairs, 16, images=False)[(1, 7)]])
    assert with_images["winner"].shape == (1, 3, 16, 16)
    assert "winner" not in without and "loser" not in without
    assert without["index"].tolist() == [1] and without["position"].tolist() == [7]


# ------------------------------------------------------------------------------ torch defaults
def test_use_sdpa_replaces_only_the_classic_processor(tiny_sd):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    unet = tiny_sd.unet
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 500])
    cond = torch.randn(2, 32, 32)
    assert use_sdpa(unet) == 0  # from_pretrained already gives SDPA
    with torch.no_grad():
        sdpa = unet(x, t, encoder_hidden_states=cond).sample
    unet.set_attn_processor(AttnProcessor())
    with torch.no_grad():
        classic = unet(x, t, encoder_hidden_states=cond).sample
    switched = use_sdpa(unet)
    assert switched == len(unet.attn_processors) > 0
    assert all(type(p) is AttnProcessor2_0 for p in unet.attn_processors.values())
    with torch.no_grad():
        again = unet(x, t, encoder_hidden_states=cond).sample
    assert torch.equal(again, sdpa)
    torch.testing.assert_close(classic, sdpa, rtol=1e-4, atol=1e-5)


def test_fused_adamw_only_on_cuda():
    cpu_param = torch.zeros(2, requires_grad=True)
    assert adamw_implementation(CPU, [cpu_param]) == {}
    cuda_param = types.SimpleNamespace(is_cuda=True, is_floating_point=lambda: True)
    assert adamw_implementation(torch.device("cuda"), [cuda_param]) == {"fused": True}
    assert adamw_implementation(torch.device("cuda"), [cuda_param, cpu_param]) == {}
