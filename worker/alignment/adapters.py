"""What gets trained, and how it is written to disk: LoRA adapters (peft) or the whole UNet.

- :func:`add_lora` injects a LoRA adapter into the UNet (``unet.add_adapter(LoraConfig(...))``)
  and leaves only its parameters trainable.
- :func:`adapters_disabled` is the reference model of LoRA training: the same UNet with its
  adapters switched off, restored even when the body raises.
- :func:`save_adapter` / :func:`load_adapter` write and read an adapter as one safetensors file
  in diffusers' LoRA layout (keys ``unet.<module>.lora_A.weight``, peft config in the
  ``lora_adapter_metadata`` header), so ``pipeline.load_lora_weights(file)`` also reads it.
  Writes are atomic (temporary file, fsync, ``os.replace``): a crash leaves either the old file
  or the new one, never a torn one. Loads are verified key by key, because
  ``unet.load_lora_adapter(dir, weight_name=...)`` silently loads *nothing* unless it is given
  ``prefix="unet"`` (it only logs a warning).
- :func:`prepare_full_finetune` makes every UNet parameter trainable and keeps a frozen deep copy
  as the reference.

Nothing here imports from the web or database layers.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from worker.alignment.backbone import Backbone

__all__ = [
    "ADAPTER_PREFIX",
    "DEFAULT_LORA_TARGETS",
    "AdapterLoadError",
    "adapter_state_dict",
    "adapters_disabled",
    "add_lora",
    "atomic_save_safetensors",
    "file_sha256",
    "fuse_adapter",
    "has_adapter",
    "load_adapter",
    "load_full_weights",
    "prepare_full_finetune",
    "read_adapter_file",
    "save_adapter",
    "save_full_weights",
    "trainable_parameters",
    "unwrap_model",
    "verify_adapter_loaded",
]

ADAPTER_PREFIX = "unet"
"""Key prefix of UNet LoRA weights in diffusers' pipeline-level LoRA files."""

DEFAULT_LORA_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
"""The attention projections Diffusion-DPO's LoRA variant (diffusers example) adapts."""

_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
_FORMAT_KEY = "prefloop_format"


class AdapterLoadError(RuntimeError):
    """An adapter file did not load into the model exactly as it was saved."""


# ------------------------------------------------------------------------------------ helpers
def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare module under DDP / ``torch.compile`` / accelerate wrappers."""
    seen = 0
    while seen < 8:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            break
        seen += 1
    return model


def _unet_of(backbone_or_unet: Backbone | nn.Module) -> nn.Module:
    unet = getattr(backbone_or_unet, "unet", backbone_or_unet)
    if not isinstance(unet, nn.Module):
        raise TypeError(f"expected a Backbone or a UNet module, got {type(backbone_or_unet)!r}")
    return unwrap_model(unet)


def _tuner_layers(unet: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]


def has_adapter(unet: nn.Module, adapter_name: str | None = None) -> bool:
    """Whether the UNet carries a peft adapter (named ``adapter_name``, or any)."""
    unet = unwrap_model(unet)
    configs = getattr(unet, "peft_config", None) or {}
    if not getattr(unet, "_hf_peft_config_loaded", False) or not configs:
        return False
    return adapter_name is None or adapter_name in configs


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters with ``requires_grad``, in ``named_parameters`` order."""
    return [p for p in module.parameters() if p.requires_grad]


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _canonical_header(data: bytes) -> bytes:
    """Re-encodes a safetensors file's JSON header with sorted keys.

    The safetensors writer emits the ``__metadata__`` entries in hash-map order, which varies
    from process to process, so two saves of identical tensors and metadata can differ in bytes
    (and SHA-256). Sorting the header makes the file a function of its contents. Offsets are
    explicit in the header, so the data section is unchanged; the header is space-padded to a
    multiple of 8 bytes as the format recommends.
    """
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    encoded = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    return len(encoded).to_bytes(8, "little") + encoded + data[8 + n :]


def atomic_save_safetensors(
    tensors: Mapping[str, torch.Tensor],
    path: str | Path,
    metadata: Mapping[str, str] | None = None,
) -> str:
    """Writes ``tensors`` to ``path`` as safetensors, atomically; returns the file's SHA-256.

    The bytes go to a temporary file in the same directory, are fsynced, and the file is then
    renamed over ``path`` with ``os.replace`` (atomic on POSIX), and the directory is fsynced.
    A reader sees the old file or the complete new one, never a partial write.
    """
    from safetensors.torch import save

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    data = _canonical_header(save(payload, metadata=dict(metadata) if metadata else None))
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------ LoRA
def add_lora(
    backbone: Backbone | nn.Module,
    rank: int = 8,
    alpha: float | None = None,
    target_modules: Sequence[str] = DEFAULT_LORA_TARGETS,
    dropout: float = 0.0,
    *,
    adapter_name: str = "default",
    init_lora_weights: bool | str = "gaussian",
) -> list[nn.Parameter]:
    """Adds a LoRA adapter to the UNet; afterwards only the adapter's parameters are trainable.

    Args:
        backbone: a :class:`Backbone` (its ``unet`` is adapted) or a UNet module.
        rank: LoRA rank r >= 1.
        alpha: LoRA alpha (the update is scaled by alpha / r); ``None`` means ``alpha = rank``.
        target_modules: module-name suffixes to adapt (default: the attention projections).
        dropout: LoRA dropout probability.
        adapter_name: peft adapter name.
        init_lora_weights: peft's initialisation (``"gaussian"`` as in diffusers' DPO example;
            lora_B starts at zero either way, so the adapted UNet starts equal to the base).

    Returns:
        The trainable (adapter) parameters, in ``named_parameters`` order.
    """
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
    unet = _unet_of(backbone)
    if has_adapter(unet, adapter_name):
        raise ValueError(f"the UNet already has an adapter named {adapter_name!r}")
    config = LoraConfig(
        r=rank,
        lora_alpha=float(alpha if alpha is not None else rank),
        init_lora_weights=init_lora_weights,
        target_modules=list(target_modules),
        lora_dropout=dropout,
    )
    unet.requires_grad_(False)
    unet.add_adapter(config, adapter_name=adapter_name)
    params = []
    for name, p in unet.named_parameters():
        is_adapter = ".lora_" in name and f".{adapter_name}." in name + "."
        p.requires_grad_(is_adapter)
        if is_adapter:
            params.append(p)
    if not params:
        raise ValueError(f"no module of the UNet matches target_modules={list(target_modules)}")
    return params


@contextmanager
def adapters_disabled(unet: nn.Module) -> Iterator[nn.Module]:
    """Runs the body with the UNet's adapters disabled: the reference model of LoRA training.

    On exit (normal or by exception) every adapter layer gets back the enabled/disabled state it
    had on entry. Yields the unwrapped UNet.
    """
    unet = unwrap_model(unet)
    layers = _tuner_layers(unet)
    if not layers:
        raise ValueError("the UNet has no adapter to disable")
    previous = [bool(layer.disable_adapters) for layer in layers]
    unet.disable_adapters()
    try:
        yield unet
    finally:
        for layer, was_disabled in zip(layers, previous, strict=True):
            layer.enable_adapters(not was_disabled)


def fuse_adapter(unet: nn.Module) -> None:
    """Fuses the UNet's LoRA adapter into its base weights and removes the adapter layers.

    Afterwards the UNet is a plain model computing what the adapted one did (up to float
    rounding), with no adapter: the next round's LoRA trains on top of it, with it as the
    reference. Raises ``ValueError`` when there is no adapter to fuse.
    """
    unet = unwrap_model(unet)
    if not has_adapter(unet):
        raise ValueError("the UNet has no adapter to fuse")
    unet.fuse_lora()  # type: ignore[operator]
    unet.unload_lora()  # type: ignore[operator]


def adapter_state_dict(unet: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's weights, keyed as peft saves them (no adapter name, no ``unet.`` prefix)."""
    from peft.utils import get_peft_model_state_dict

    unet = unwrap_model(unet)
    if not has_adapter(unet, adapter_name):
        raise ValueError(f"the UNet has no adapter named {adapter_name!r}")
    return dict(get_peft_model_state_dict(unet, adapter_name=adapter_name))


def _adapter_metadata(unet: nn.Module, adapter_name: str) -> dict[str, Any]:
    config = unwrap_model(unet).peft_config[adapter_name].to_dict()
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, set):
            value = sorted(value)
        out[f"{ADAPTER_PREFIX}.{key}"] = value
    return out


def save_adapter(
    unet: nn.Module,
    path: str | Path,
    *,
    adapter_name: str = "default",
    metadata: Mapping[str, str] | None = None,
) -> str:
    """Writes the UNet's LoRA adapter to ``path`` (a ``.safetensors`` file), atomically.

    The file uses diffusers' pipeline LoRA layout: keys ``unet.<module>.lora_A.weight`` etc., and
    the peft config (rank, alpha, targets) JSON-encoded in the ``lora_adapter_metadata`` header.
    Extra string ``metadata`` is stored in the header too.

    Returns:
        The hex SHA-256 of the written file.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"adapter path must end in .safetensors, got {path}")
    weights = adapter_state_dict(unet, adapter_name)
    tensors = {f"{ADAPTER_PREFIX}.{k}": v for k, v in weights.items()}
    header = {str(k): str(v) for k, v in (metadata or {}).items()}
    header[_METADATA_KEY] = json.dumps(_adapter_metadata(unet, adapter_name), sort_keys=True)
    header[_FORMAT_KEY] = "lora-v1"
    header["format"] = "pt"
    return atomic_save_safetensors(tensors, path, header)


def read_adapter_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors (keys as in the file) and the header metadata of a safetensors file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file not found: {path}")
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = dict(f.metadata() or {})
        for key in f.keys():
            tensors[key] = f.get_tensor(key)
    return tensors, meta


def verify_adapter_loaded(
    unet: nn.Module,
    saved: str | Path | Mapping[str, torch.Tensor],
    adapter_name: str = "default",
) -> None:
    """Raises :class:`AdapterLoadError` unless the UNet's adapter equals the saved weights exactly.

    ``saved`` is an adapter file or its tensors (keys with or without the ``unet.`` prefix). Every
    saved key must be present in the model's adapter and bit-identical (after casting the saved
    tensor to the model's dtype), and the model's adapter must have no extra keys.
    """
    tensors = read_adapter_file(saved)[0] if isinstance(saved, str | Path) else dict(saved)
    expected = {k.removeprefix(f"{ADAPTER_PREFIX}."): v for k, v in tensors.items()}
    if not expected:
        raise AdapterLoadError("the saved adapter has no tensors")
    unet = unwrap_model(unet)
    if not has_adapter(unet, adapter_name):
        raise AdapterLoadError(
            f"no adapter named {adapter_name!r} is in the model after loading: nothing was "
            f"loaded (a LoRA file read without prefix={ADAPTER_PREFIX!r} loads nothing)"
        )
    actual = adapter_state_dict(unet, adapter_name)
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    if missing or extra:
        raise AdapterLoadError(
            f"adapter keys differ: {len(missing)} saved keys not loaded (e.g. {missing[:3]}), "
            f"{len(extra)} model keys not in the file (e.g. {extra[:3]})"
        )
    wrong = [
        k
        for k, v in expected.items()
        if actual[k].shape != v.shape
        or not torch.equal(actual[k].detach().cpu(), v.to(actual[k].dtype))
    ]
    if wrong:
        raise AdapterLoadError(
            f"{len(wrong)} of {len(expected)} adapter tensors differ from the saved ones "
            f"(e.g. {wrong[:3]})"
        )


def load_adapter(
    unet: nn.Module,
    path: str | Path,
    *,
    adapter_name: str = "default",
    replace: bool = False,
) -> None:
    """Loads a LoRA adapter file written by :func:`save_adapter` into the UNet, and verifies it.

    Goes through diffusers' ``unet.load_lora_adapter(dir, weight_name=..., prefix="unet")`` and
    then checks that every saved tensor is in the model, bit-identical
    (:func:`verify_adapter_loaded`); a silent partial or empty load raises
    :class:`AdapterLoadError`.

    Args:
        unet: the UNet (without an adapter named ``adapter_name``, unless ``replace``).
        path: the ``.safetensors`` file.
        adapter_name: peft adapter name to load it as.
        replace: delete an existing adapter of that name first.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file not found: {path}")
    unet = unwrap_model(unet)
    if has_adapter(unet, adapter_name):
        if not replace:
            raise ValueError(
                f"the UNet already has an adapter named {adapter_name!r}; pass replace=True"
            )
        unet.delete_adapters(adapter_name)
    unet.load_lora_adapter(
        str(path.parent),
        weight_name=path.name,
        prefix=ADAPTER_PREFIX,
        adapter_name=adapter_name,
        local_files_only=True,
    )
    verify_adapter_loaded(unet, path, adapter_name)


# ------------------------------------------------------------------------------------ full FT
def prepare_full_finetune(backbone: Backbone) -> nn.Module:
    """Makes every UNet parameter trainable and keeps a frozen deep copy as the reference.

    The copy is taken before any training, is in eval mode with ``requires_grad=False``, and is
    stored in ``backbone.extra["reference_unet"]`` (and returned). Calling this again returns
    the existing reference.
    """
    existing = backbone.extra.get("reference_unet")
    unet = unwrap_model(backbone.unet)
    if has_adapter(unet):
        raise ValueError("full fine-tuning of a UNet that carries a LoRA adapter is not supported")
    if existing is None:
        reference = copy.deepcopy(unet)
        reference.requires_grad_(False)
        reference.eval()
        backbone.extra["reference_unet"] = reference
        existing = reference
    unet.requires_grad_(True)
    return existing


def save_full_weights(
    unet: nn.Module, path: str | Path, metadata: Mapping[str, str] | None = None
) -> str:
    """Writes the whole UNet state dict to ``path`` (safetensors), atomically; returns SHA-256."""
    header = {str(k): str(v) for k, v in (metadata or {}).items()}
    header[_FORMAT_KEY] = "unet-full-v1"
    state = unwrap_model(unet).state_dict()
    return atomic_save_safetensors(state, path, header)


def load_full_weights(unet: nn.Module, path: str | Path) -> None:
    """Loads a file written by :func:`save_full_weights` (strict: every key must match)."""
    tensors, _ = read_adapter_file(path)
    unwrap_model(unet).load_state_dict(tensors, strict=True)
