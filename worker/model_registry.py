"""Loading a model version: its base model plus the adapters of its lineage, cached per process.

A :class:`~backend.models.ModelVersion` is a base model (``builtin:shapes``, a hub id or a
local diffusers directory) and, unless it is the base itself, one adapter file trained *on top
of its parent*. A round trains a fresh LoRA on the parent with every ancestor's adapter fused
into the UNet (the parent is the DPO reference), so loading version ``v`` means:

1. load the base model of the lineage's root;
2. for each version from the root's first child down to ``v``: check the file's SHA-256
   against the row (refuse on a mismatch: :class:`AdapterIntegrityError`), load it, and fuse
   it into the UNet weights.

Adapter files come in two formats, told apart by their safetensors header (see
:mod:`worker.alignment.adapters`): a LoRA adapter (``lora-v1``) or full UNet weights
(``unet-full-v1``, a round with ``full_finetune``).

Loaded versions are kept in a small LRU cache keyed by the lineage's ``(version id, sha256)``
pairs, so the pair pool and the evaluator do not reload the model for every batch. A cached
backbone is shared: callers only sample from it. Training asks for ``fresh=True`` and gets its
own copy to modify.

Stored adapter paths are keys of the artifact store (:func:`backend.storage.artifact_store`:
``<data_dir>/models`` on local disk, or object storage), so a data directory or a bucket can
move as a whole; absolute paths name local files and are accepted too. On object storage an
adapter is downloaded once into ``<data_dir>/cache/artifacts/<sha256>.safetensors`` (checked
before it is kept); on local disk the stored file is read in place. Either way the file is
checked against the row's SHA-256 before it is loaded, and the row is the only way to it: an
adapter being uploaded has no row yet, so no loader can see it half-written.

A backbone that a round has trained still holds its parent: :func:`parent_view` gives it
(adapters disabled, or the frozen reference copy of a full fine-tune).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import select
from sqlalchemy.orm import Session

from backend.model_family import BUILTIN, BUILTIN_SHAPES, family_of
from backend.models import ModelVersion
from backend.storage import IntegrityError, ObjectStore, UnsafePath
from worker.alignment.adapters import (
    file_sha256,
    fuse_adapter,
    load_adapter,
    load_full_weights,
    read_adapter_file,
)
from worker.alignment.backbone import Backbone

log = logging.getLogger(__name__)

#: How many loaded versions one process keeps (the serving version and its parent, typically).
CACHE_SIZE = 3
_FORMAT_KEY = "prefloop_format"
_MAX_LINEAGE = 10_000


class AdapterIntegrityError(RuntimeError):
    """A version's adapter file is missing or its SHA-256 differs from the database's."""


@dataclass(frozen=True)
class VersionLink:
    """One version of a lineage, as the loader needs it (no ORM object crosses threads).

    ``adapter_path`` is the stored path: a key of ``store`` (or an absolute local path)."""

    id: int
    name: str
    base_model: str
    adapter_path: str | None
    adapter_sha256: str | None
    store: ObjectStore | None = field(default=None, compare=False, repr=False)


# ---------------------------------------------------------------------------- base models
def is_builtin(base_model: str) -> bool:
    """Whether ``base_model`` is the built-in world's model (its judge and renderer apply):
    ``builtin:*`` (``builtin:shapes`` is the shipped checkpoint) or the directory of a built-in
    checkpoint (one re-trained with ``python -m worker.shapes.pretrain --out DIR``, or a
    test's). The API's round defaults ask the same registry (:mod:`backend.model_family`)."""
    family = family_of(base_model)
    return family is not None and family.name == BUILTIN.name


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_base(base_model: str, *, device: torch.device | str | None = None) -> Backbone:
    """The base model as a Backbone: the built-in model, or a diffusers SD / SDXL pipeline."""
    device = torch.device(device) if device is not None else default_device()
    if is_builtin(base_model):
        from worker.shapes.model import load_builtin

        path = None if base_model == BUILTIN_SHAPES else Path(base_model).expanduser()
        return load_builtin(path, device=device)
    from worker.alignment.models import load_backbone

    return load_backbone(base_model, device=device)


# ---------------------------------------------------------------------------- lineage
def models_store(models: Path | str | ObjectStore) -> ObjectStore:
    """``models`` as the store that stored adapter paths are keys of (a directory: local)."""
    return models if isinstance(models, ObjectStore) else ObjectStore(models)


def lineage(
    session: Session, version_id: int, models_dir: Path | str | ObjectStore
) -> list[VersionLink]:
    """The versions from the root (a base model, no adapter) down to ``version_id``.

    ``models_dir``: the artifact store (:func:`backend.storage.artifact_store`), or the local
    directory stored adapter paths are relative to."""
    store = models_store(models_dir)
    chain: list[VersionLink] = []
    seen: set[int] = set()
    current: int | None = version_id
    while current is not None:
        if current in seen or len(chain) > _MAX_LINEAGE:
            raise ValueError(f"version {version_id} has a cyclic lineage")
        seen.add(current)
        row = session.scalars(select(ModelVersion).where(ModelVersion.id == current)).first()
        if row is None:
            raise LookupError(f"version {current} not found")
        chain.append(
            VersionLink(
                id=row.id,
                name=row.name,
                base_model=row.base_model,
                adapter_path=row.adapter_path or None,
                adapter_sha256=row.adapter_sha256,
                store=store,
            )
        )
        current = row.parent_id
    chain.reverse()
    if chain[0].adapter_path is not None:
        raise ValueError(
            f"version {chain[0].id} ({chain[0].name}) has an adapter but no parent: its base "
            "model's version is missing from the lineage"
        )
    return chain


def _local_adapter(link: VersionLink) -> Path:
    """The adapter of ``link`` as a local file: an absolute stored path as it is, else fetched
    from its store (read in place on local disk, downloaded once from object storage)."""
    assert link.adapter_path is not None
    where = link.adapter_path
    if Path(where).is_absolute():
        return Path(where)
    if link.store is None:
        raise AdapterIntegrityError(f"version {link.id} ({link.name}): no store for {where}")
    try:
        return link.store.fetch(where, link.adapter_sha256)
    except FileNotFoundError:
        raise AdapterIntegrityError(
            f"adapter of version {link.id} ({link.name}) not found at {link.store.url}/{where}"
        ) from None
    except UnsafePath:
        raise AdapterIntegrityError(
            f"adapter of version {link.id} ({link.name}): {where!r} leaves the model store"
        ) from None
    except IntegrityError as exc:
        raise AdapterIntegrityError(
            f"adapter of version {link.id} ({link.name}): {exc}; refusing to load it"
        ) from None


def verify_adapter(link: VersionLink) -> Path:
    """The adapter file of ``link`` (local), after checking it exists and its SHA-256 matches."""
    if link.adapter_path is None:
        raise AdapterIntegrityError(f"version {link.id} has no adapter")
    if not link.adapter_sha256:
        raise AdapterIntegrityError(f"version {link.id} ({link.name}) has no adapter sha256")
    path = _local_adapter(link)
    if not path.is_file():
        raise AdapterIntegrityError(
            f"adapter of version {link.id} ({link.name}) not found at {link.adapter_path}"
        )
    actual = file_sha256(path)
    if actual != link.adapter_sha256:
        raise AdapterIntegrityError(
            f"adapter of version {link.id} ({link.name}) at {path} has sha256 "
            f"{actual}, but the database says {link.adapter_sha256}; refusing to load it"
        )
    return path


def apply_adapter(backbone: Backbone, path: Path) -> None:
    """Load one verified adapter file into the UNet and fuse it into the weights."""
    _, header = read_adapter_file(path)
    fmt = header.get(_FORMAT_KEY, "lora-v1")
    if fmt == "unet-full-v1":
        load_full_weights(backbone.unet, path)
        return
    if fmt != "lora-v1":
        raise AdapterIntegrityError(f"unknown adapter format {fmt!r} in {path}")
    unet = backbone.unet
    load_adapter(unet, path, adapter_name="default")
    fuse_adapter(unet)


def load_lineage(chain: list[VersionLink], *, device: torch.device | str | None = None) -> Backbone:
    """Build the Backbone of ``chain[-1]`` (uncached); every adapter is verified first."""
    if not chain:
        raise ValueError("empty lineage")
    paths = [verify_adapter(link) for link in chain[1:]]
    backbone = load_base(chain[0].base_model, device=device)
    for path in paths:
        apply_adapter(backbone, path)
    backbone.unet.eval()
    backbone.unet.requires_grad_(False)
    leaf = chain[-1]
    backbone.extra["version_id"] = leaf.id
    backbone.extra["version_name"] = leaf.name
    return backbone


@contextmanager
def parent_view(backbone: Any) -> Iterator[Any]:
    """The parent model inside a trained backbone: adapters disabled (LoRA) or the frozen
    reference copy (full fine-tune)."""
    import dataclasses

    from worker.alignment.adapters import adapters_disabled, has_adapter

    reference = backbone.extra.get("reference_unet")
    if reference is not None:
        yield dataclasses.replace(backbone, unet=reference)
    elif has_adapter(backbone.unet):
        with adapters_disabled(backbone.unet):
            yield backbone
    else:
        raise RuntimeError("the trained backbone has neither an adapter nor a reference copy")


# ---------------------------------------------------------------------------- cache
_cache: OrderedDict[tuple[tuple[int, str | None], ...], Backbone] = OrderedDict()
_cache_lock = threading.Lock()


def _key(chain: list[VersionLink]) -> tuple[tuple[int, str | None], ...]:
    return tuple((link.id, link.adapter_sha256) for link in chain)


def load_chain(
    chain: list[VersionLink],
    *,
    fresh: bool = False,
    device: torch.device | str | None = None,
) -> Backbone:
    """The Backbone of ``chain[-1]`` (see :func:`lineage`), from the cache unless ``fresh``.

    No database access: callers read the lineage in a short transaction and load outside it.
    """
    if fresh:
        return load_lineage(chain, device=device)
    key = _key(chain)
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            return hit
        # Loading under the lock: two threads asking for one version load it once.
        backbone = load_lineage(chain, device=device)
        _cache[key] = backbone
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    log.info("loaded version %s (%s)", chain[-1].id, chain[-1].name)
    return backbone


def load_version(
    session: Session,
    version: int | ModelVersion,
    *,
    models_dir: Path | str | ObjectStore,
    fresh: bool = False,
    device: torch.device | str | None = None,
) -> Backbone:
    """The Backbone of a version (base model + its lineage's adapters, fused).

    Args:
        session: reads the version and its ancestors.
        version: a version id or row.
        models_dir: the artifact store (:func:`backend.storage.artifact_store`), or the local
            directory stored adapter paths are relative to.
        fresh: load a private copy, outside the cache (training modifies its backbone).
        device: default: CUDA when available, else the CPU.

    Raises:
        AdapterIntegrityError: an adapter file is missing or its SHA-256 does not match.
    """
    version_id = version if isinstance(version, int) else version.id
    return load_chain(lineage(session, version_id, models_dir), fresh=fresh, device=device)


def clear_cache() -> None:
    with _cache_lock:
        _cache.clear()
