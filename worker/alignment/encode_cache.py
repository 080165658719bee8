"""The round's frozen encodings, computed once: VAE latent distributions and prompt embeddings.

The VAE and the text encoder(s) are frozen during a round, and so are the round's pairs, so the
trainer need not run them at every step. :func:`load_or_build` encodes, once per round:

- every training image's VAE latent *distribution* (``mean`` and ``std`` of diffusers'
  ``DiagonalGaussianDistribution``), when the model has a VAE (SD, SDXL; the pixel-space
  built-in model has none and nothing is cached for its images);
- every distinct prompt's :class:`~worker.alignment.backbone.Conditioning` (token embeddings,
  and SDXL's pooled embedding and size ids);

and keeps them in one file beside the round's checkpoints
(``<output_dir>/encode-cache/<key>.safetensors``). A step then *samples* each latent from its cached
distribution with the pair's own seeded generator, the same draw ``dist.sample(generator)``
makes (:meth:`EncodingCache.sample_latents`), so the run consumes every generator in the same
order as without the cache and stays a function of (seed, data, config).

The file name is a hash of everything the encodings depend on: the model (name, kind, a
fingerprint of the VAE's and text encoders' weights, their dtypes), the resolution, the device
type, the prompts and the bytes of every image, in order. A resumed round finds its file and
loads it; a round on another model or snapshot finds none, encodes anew and removes the old file.
The file (safetensors) is written atomically (:func:`backend.fileio.atomic_write`); a step reads
its batch's rows from it with ``pread``, so however large the cache, the process keeps none of it
in memory (the kernel's page cache serves the reads). An unreadable, incomplete or mismatched file
is rebuilt. While the cache is built, the encodings are held in memory once more than the file
(the tensors, then the file's bytes), before the first step.

Size: ``2 x 4 bytes x C x h x w`` per image (fp32 latents), i.e. 128 KB per image for SD1.5 at
512 px (4 x 64 x 64), 512 KB for SDXL at 1024 px; plus ``4 x L x D`` bytes per distinct prompt
(236 KB for CLIP-L, 77 x 768).

Nothing here imports from the web or database layers (``backend.fileio`` is torch-free and
standalone).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from worker.alignment.backbone import Backbone, Conditioning
from worker.alignment.data import PreferencePair, image_to_tensor

__all__ = [
    "CACHE_DIRNAME",
    "FORMAT_VERSION",
    "EncodingCache",
    "cache_key",
    "load_or_build",
]

logger = logging.getLogger(__name__)

CACHE_DIRNAME = "encode-cache"
FORMAT_VERSION = 2
_SUFFIX = ".safetensors"
_LATENTS = ("latent_mean", "latent_std")
_ADDED = ("text_embeds", "time_ids")
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
}


class _MemoryRows:
    """Rows of tensors held in memory (a cache encoded by a process that does not write)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def rows(self, name: str, index: Sequence[int]) -> torch.Tensor:
        return self.tensors[name].index_select(0, torch.tensor(list(index), dtype=torch.long))

    def close(self) -> None:
        pass


class _FileRows:
    """Rows of the tensors of a safetensors file, read with ``pread`` when asked for.

    Nothing of the file stays in the process (no mmap): a step reads its batch's rows (the page
    cache serves them) into fresh tensors, so the cache adds nothing to the process's resident
    memory however large it is.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = -1
        self.fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(self.fd).st_size
            (n,) = struct.unpack("<Q", os.pread(self.fd, 8, 0))
            if n <= 0 or 8 + n > size:
                raise ValueError("bad header length")
            header = json.loads(os.pread(self.fd, n, 8))
            self.metadata: dict[str, str] = dict(header.pop("__metadata__", None) or {})
            self.layout: dict[str, tuple[torch.dtype, tuple[int, ...], int]] = {}
            end = 0
            for name, info in header.items():
                begin, stop = (int(v) for v in info["data_offsets"])
                self.layout[name] = (_DTYPES[info["dtype"]], tuple(info["shape"]), 8 + n + begin)
                end = max(end, stop)
            if 8 + n + end != size:
                raise ValueError(f"{size} bytes, the header describes {8 + n + end}")
        except BaseException:
            self.close()
            raise

    def __contains__(self, name: str) -> bool:
        return name in self.layout

    def rows(self, name: str, index: Sequence[int]) -> torch.Tensor:
        dtype, shape, offset = self.layout[name]
        row_bytes = math.prod(shape[1:]) * torch.empty((), dtype=dtype).element_size()
        buf = bytearray(len(index) * row_bytes)
        view = memoryview(buf)
        for k, r in enumerate(index):
            if not 0 <= r < shape[0]:
                raise IndexError(f"row {r} of {name} {shape}")
            chunk = os.pread(self.fd, row_bytes, offset + r * row_bytes)
            if len(chunk) != row_bytes:
                raise OSError(f"short read from {self.path}")
            view[k * row_bytes : (k + 1) * row_bytes] = chunk
        return torch.frombuffer(buf, dtype=dtype).reshape(len(index), *shape[1:])

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:
        self.close()


@dataclass
class EncodingCache:
    """A round's encodings: read by rows from the cache file (or held in memory).

    The stored tensors: ``hidden`` ``[P, L, D]`` token embeddings, one row per distinct prompt
    (SDXL adds ``text_embeds`` ``[P, D2]`` and ``time_ids`` ``[P, 6]``); with a VAE,
    ``latent_mean`` and ``latent_std`` ``[2N, C, h, w]`` in the VAE's dtype, the winner of pair
    i at row 2i and its loser at 2i + 1.

    Attributes:
        key: the hash the file is named by (:func:`cache_key`).
        prompts: the distinct prompts, in the order of the rows of ``hidden``.
        scaling_factor: the VAE's ``scaling_factor`` (applied after sampling, as
            :meth:`Backbone.images_to_latents` does).
        channels_last: the VAE gave its distribution in channels-last order (oneDNN on a CPU
            does); the sampled latents are laid out alike, so the UNet gets the very tensor it
            would get from the VAE (its convolutions round differently on another layout).
        reused: True when the file was there already (a resumed round), False when built now.
        path: the cache file, or None for a cache held in memory.
    """

    key: str
    prompts: list[str]
    store: _MemoryRows | _FileRows
    scaling_factor: float
    channels_last: bool = False
    reused: bool = False
    path: Path | None = None

    def __post_init__(self) -> None:
        self._row = {p: i for i, p in enumerate(self.prompts)}

    @property
    def has_latents(self) -> bool:
        return "latent_mean" in self.store

    def close(self) -> None:
        """Closes the cache file (a closed cache cannot be read)."""
        self.store.close()

    def conditioning(self, prompts: Sequence[str], device: torch.device) -> Conditioning:
        """The :class:`Conditioning` of ``prompts`` (rows in their order), on ``device``."""
        rows = [self._row[p] for p in prompts]
        hidden = self.store.rows("hidden", rows).to(device)
        added = None
        if "text_embeds" in self.store:
            added = {k: self.store.rows(k, rows).to(device) for k in _ADDED}
        return Conditioning(hidden, added)

    def latent_distribution(self, pair_indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, std)``, each ``[2B, C, h, w]`` on the CPU, of the batch ``[winners; losers]``."""
        if not self.has_latents:
            raise ValueError("this cache holds no latents (the model has no VAE)")
        idx = [2 * int(i) for i in pair_indices] + [2 * int(i) + 1 for i in pair_indices]
        return self.store.rows("latent_mean", idx), self.store.rows("latent_std", idx)

    def sample_latents(
        self,
        pair_indices: Sequence[int],
        generators: Sequence[torch.Generator],
        device: torch.device,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """``[2B, C, h, w]`` scaled latents of the batch ``[winners; losers]``, drawn from the
        cached distributions with ``generators`` (one per pair, used for its winner then its
        loser, as ``backbone.images_to_latents(images, generator=gens + gens)`` uses them).

        Draws exactly what ``DiagonalGaussianDistribution.sample`` draws: diffusers'
        ``randn_tensor`` on the distribution's device and dtype, then ``mean + std * noise``.
        """
        from diffusers.utils.torch_utils import randn_tensor

        mean, std = self.latent_distribution(pair_indices)
        mean, std = mean.to(device), std.to(device)
        if self.channels_last:
            mean = mean.contiguous(memory_format=torch.channels_last)
            std = std.contiguous(memory_format=torch.channels_last)
        gens = list(generators) + list(generators)
        noise = randn_tensor(mean.shape, generator=gens, device=mean.device, dtype=mean.dtype)
        z = mean + std * noise
        return (z * self.scaling_factor).to(dtype)


# ============================================================================ the key
def _image_digest(h: Any, image: Any) -> None:
    """Feeds the bytes of one image (any :data:`~worker.alignment.data.ImageLike`) to ``h``."""
    if isinstance(image, torch.Tensor):
        arr = image.detach().cpu().contiguous().numpy()
        h.update(f"t{arr.dtype}{arr.shape}".encode())
        h.update(arr.tobytes())
    elif isinstance(image, np.ndarray):
        arr = np.ascontiguousarray(image)
        h.update(f"n{arr.dtype}{arr.shape}".encode())
        h.update(arr.tobytes())
    elif hasattr(image, "tobytes") and hasattr(image, "mode") and hasattr(image, "size"):
        h.update(f"p{image.mode}{tuple(image.size)}".encode())  # PIL
        h.update(image.tobytes())
    else:
        raise TypeError(f"unsupported image type {type(image).__name__}")


def _weights_digest(h: Any, module: torch.nn.Module | None, label: str) -> None:
    """A fingerprint of a frozen module: every tensor's name, shape and dtype, and 64 values
    spread over it (enough to tell two checkpoints apart without hashing gigabytes)."""
    h.update(f"\x00{label}".encode())
    if module is None:
        return
    with torch.no_grad():
        for name, t in module.state_dict().items():
            flat = t.detach().reshape(-1)
            step = max(1, flat.numel() // 64)
            sample = flat[::step][:64].to("cpu", torch.float64).numpy()
            h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
            h.update(sample.tobytes())


def _dtype_of(module: torch.nn.Module | None) -> str:
    if module is None:
        return "-"
    return str(next(module.parameters()).dtype)


def cache_key(
    backbone: Backbone,
    pairs: Sequence[PreferencePair],
    resolution: int,
    device: torch.device,
) -> str:
    """The hash naming a cache file: the model, the resolution, the device type, and the
    prompts and images in order. Anything that changes an encoding changes the key."""
    bb = backbone
    h = hashlib.sha256()
    h.update(
        "|".join(
            [
                f"v{FORMAT_VERSION}",
                bb.kind,
                str(bb.name),
                str(resolution),
                device.type,
                _dtype_of(bb.vae),
                _dtype_of(bb.text_encoder),
                _dtype_of(bb.text_encoder_2),
                str(bb.dtype),  # encode_prompts casts to the UNet's dtype
                str(len(pairs)),
            ]
        ).encode()
    )
    _weights_digest(h, bb.vae, "vae")
    _weights_digest(h, bb.text_encoder, "text_encoder")
    _weights_digest(h, bb.text_encoder_2, "text_encoder_2")
    for p in pairs:
        h.update(b"\x01" + p.prompt.encode("utf-8"))
        if bb.vae is not None:
            _image_digest(h, p.winner)
            _image_digest(h, p.loser)
    return h.hexdigest()[:32]


# ============================================================================ build / load
@torch.no_grad()
def _encode(
    backbone: Backbone,
    pairs: Sequence[PreferencePair],
    resolution: int,
    device: torch.device,
    batch_size: int,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, Any] | None:
    # as the step does without a cache: no autocast around the frozen encoders (the VAE and the
    # text encoders already run in the dtypes the trainer gave them)
    bb = backbone
    prompts = list(dict.fromkeys(p.prompt for p in pairs))
    hidden, added = [], []
    for s in range(0, len(prompts), batch_size):
        if should_stop is not None and should_stop():
            return None
        cond = bb.encode_prompts(prompts[s : s + batch_size])
        hidden.append(cond.encoder_hidden_states.cpu())
        if cond.added_cond_kwargs is not None:
            added.append({k: v.cpu() for k, v in cond.added_cond_kwargs.items()})
    out: dict[str, Any] = {"prompts": prompts, "hidden": torch.cat(hidden)}
    for name in _ADDED if added else ():
        out[name] = torch.cat([a[name] for a in added])
    if bb.vae is not None:
        vae_dtype = next(bb.vae.parameters()).dtype
        means, stds = [], []
        channels_last = False
        per_chunk = max(1, batch_size // 2)
        for s in range(0, len(pairs), per_chunk):
            if should_stop is not None and should_stop():
                return None
            images = []
            for p in pairs[s : s + per_chunk]:
                images += [
                    image_to_tensor(p.winner, resolution),
                    image_to_tensor(p.loser, resolution),
                ]
            x = torch.stack(images).to(device, vae_dtype)
            dist = bb.vae.encode(x).latent_dist
            if dist.mean.dim() == 4 and dist.mean.stride(1) < dist.mean.stride(3):
                channels_last = True
            means.append(dist.mean.cpu())
            stds.append(dist.std.cpu())
        out["latent_mean"] = torch.cat(means).contiguous()
        out["latent_std"] = torch.cat(stds).contiguous()
        out["channels_last"] = channels_last
    return out


def _open(path: Path, key: str, scaling_factor: float) -> EncodingCache | None:
    """The cache file at ``path`` if it is complete and of ``key``, else None."""
    try:
        store = _FileRows(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is rebuilt
        logger.warning("encode cache %s unreadable (%s); rebuilding", path, exc)
        return None
    meta = store.metadata
    if meta.get("key") != key or meta.get("version") != str(FORMAT_VERSION):
        store.close()
        logger.warning("encode cache %s belongs to another run; rebuilding", path)
        return None
    return EncodingCache(
        key=key,
        prompts=list(json.loads(meta["prompts"])),
        store=store,
        scaling_factor=scaling_factor,
        channels_last=meta.get("channels_last") == "1",
        path=path,
    )


def load_or_build(
    backbone: Backbone,
    pairs: Sequence[PreferencePair],
    *,
    resolution: int,
    directory: str | Path,
    device: torch.device,
    batch_size: int = 16,
    write: bool = True,
    should_stop: Callable[[], bool] | None = None,
) -> EncodingCache | None:
    """The round's :class:`EncodingCache`: loaded from ``directory`` when a file of this key is
    there, else encoded (``batch_size`` images or prompts per pass) and written atomically.

    Call it after the backbone is on its device and in its training dtypes (the key and the
    encodings depend on both). ``write=False`` (the non-main processes of a multi-process run)
    never writes: it loads the file the main process wrote, or encodes in memory.
    ``should_stop`` is polled between batches while encoding; True returns None (nothing
    written).
    """
    from backend.fileio import atomic_write

    bb = backbone
    directory = Path(directory)
    key = cache_key(bb, pairs, resolution, device)
    path = directory / f"{key}{_SUFFIX}"
    scaling = float(bb.vae.config.scaling_factor) if bb.vae is not None else 1.0
    if path.is_file():
        cache = _open(path, key, scaling)
        if cache is not None:
            logger.info("encode cache: reusing %s", path)
            cache.reused = True
            return cache
    data = _encode(bb, pairs, resolution, device, batch_size, should_stop)
    if data is None:
        return None
    prompts: list[str] = data.pop("prompts")
    channels_last = bool(data.pop("channels_last", False))
    if not write:
        return EncodingCache(key, prompts, _MemoryRows(data), scaling, channels_last)
    from safetensors.torch import save

    metadata = {
        "key": key,
        "version": str(FORMAT_VERSION),
        "prompts": json.dumps(prompts),
        "channels_last": "1" if channels_last else "0",
        "model": str(bb.name),
    }
    payload = save({k: v.contiguous() for k, v in data.items()}, metadata=metadata)
    del data
    for stale in directory.glob(".*.tmp"):  # a writer killed before its rename
        stale.unlink(missing_ok=True)
    atomic_write(path, payload)
    for old in directory.glob(f"*{_SUFFIX}"):  # another snapshot's or model's cache
        if old != path:
            old.unlink(missing_ok=True)
    logger.info("encode cache: wrote %s (%.1f MB)", path, len(payload) / 2**20)
    del payload
    # this run reads the file as a resumed run will: the same bytes, and nothing kept in memory
    cache = _open(path, key, scaling)
    if cache is None:
        raise OSError(f"the encode cache just written to {path} cannot be read back")
    return cache
