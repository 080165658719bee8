"""Model versions: lineage, publishing and retiring.

Exactly one version is *published* (serving) at a time: the pair pool samples from it, and a
partial unique index on ``status = 'published'`` makes a second one impossible. Publishing
version X is one transaction that retires the current published version and publishes X, so
readers see either the old or the new serving version, never none or two. A rollback is
publishing an earlier version again (usually the parent): it becomes serving and the current
one is retired. Retired versions keep their adapter, images and votes, so they stay on the
leaderboard and can be published again. The serving version cannot be retired directly
(publish another one instead), so there is always something to serve.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from backend.models import ModelVersion, VersionStatus
from backend.services.errors import Conflict, NotFound
from backend.storage import ObjectStore, UnsafePath


def get_version(session: Session, version_id: int, *, for_update: bool = False) -> ModelVersion:
    q = select(ModelVersion).where(ModelVersion.id == version_id)
    if for_update:
        q = q.with_for_update()
    version = session.scalars(q).first()
    if version is None:
        raise NotFound(f"version {version_id} not found")
    return version


def list_versions(
    session: Session, *, offset: int = 0, limit: int = 100, status: VersionStatus | None = None
) -> tuple[list[ModelVersion], int]:
    q = select(ModelVersion)
    c = select(func.count()).select_from(ModelVersion)
    if status is not None:
        q = q.where(ModelVersion.status == status)
        c = c.where(ModelVersion.status == status)
    rows = list(session.scalars(q.order_by(ModelVersion.id).offset(offset).limit(limit)))
    return rows, session.scalar(c) or 0


def serving_version(session: Session) -> ModelVersion | None:
    return session.scalars(
        select(ModelVersion).where(ModelVersion.status == VersionStatus.published)
    ).first()


def publish(session: Session, version_id: int) -> ModelVersion:
    """Make ``version_id`` the serving version (idempotent)."""
    version = get_version(session, version_id, for_update=True)
    if version.status == VersionStatus.published:
        return version
    session.execute(
        update(ModelVersion)
        .where(ModelVersion.status == VersionStatus.published, ModelVersion.id != version_id)
        .values(status=VersionStatus.retired)
    )
    version.status = VersionStatus.published
    version.published_at = datetime.now(UTC)
    session.flush()
    return version


def retire(session: Session, version_id: int) -> ModelVersion:
    """Retire a candidate (idempotent on retired ones); 409 for the serving version."""
    version = get_version(session, version_id, for_update=True)
    if version.status == VersionStatus.published:
        raise Conflict(
            f"version {version_id} is the serving version; publish another version first"
        )
    version.status = VersionStatus.retired
    session.flush()
    return version


def ensure_base_version(session: Session, base_model: str) -> ModelVersion:
    """The version row of the base model (name = the model id), published when nothing is."""
    version = session.scalars(select(ModelVersion).where(ModelVersion.name == base_model)).first()
    if version is None:
        version = ModelVersion(
            name=base_model, base_model=base_model, status=VersionStatus.candidate, metrics={}
        )
        session.add(version)
        session.flush()
    if serving_version(session) is None:
        version.status = VersionStatus.published
        version.published_at = datetime.now(UTC)
        session.flush()
    return version


def get_or_create_external(session: Session, model_name: str) -> ModelVersion:
    """A retired version standing for an outside model (a dataset import's ``model_0/1``)."""
    name = f"external:{model_name}"[:255]
    version = session.scalars(select(ModelVersion).where(ModelVersion.name == name)).first()
    if version is None:
        version = ModelVersion(
            name=name,
            base_model=model_name[:1024],
            status=VersionStatus.retired,
            metrics={"external": True},
        )
        session.add(version)
        session.flush()
    return version


# ---------------------------------------------------------------------------- validation samples
# Written by the worker (worker/validation_grid.py, uploaded by worker/rounds.py) beside the
# version's adapter, in ``<dirname(adapter_path)>/samples/`` of the artifact store
# (backend.storage.artifact_store: ``<data_dir>/models`` or object storage), the manifest
# last; only the JSON manifest and the files it names are read here.
SAMPLES_DIRNAME = "samples"
SAMPLES_MANIFEST = "samples.json"
SAMPLE_FILENAME = re.compile(r"(?:parent|candidate)-[0-9]{2}\.png|grid\.png", re.ASCII)
#: A manifest larger than this is not read (a real one is a few KB).
_MANIFEST_MAX_BYTES = 1 << 20


@dataclass(frozen=True)
class SampleRow:
    prompt: str
    seed: int
    parent: str
    candidate: str


@dataclass(frozen=True)
class VersionSamples:
    version_id: int
    parent_id: int | None
    rows: list[SampleRow]
    grid: str | None
    created_at: datetime | None


def _no_samples(version_id: int) -> NotFound:
    return NotFound(
        f"version {version_id} has no validation samples "
        "(it was made before rounds rendered them, or by import)"
    )


def samples_prefix(artifacts: ObjectStore, version: ModelVersion) -> str | None:
    """The key (in ``artifacts``) of ``version``'s validation samples, or None when it has no
    adapter (the base model, an import) or its adapter path leaves the store."""
    if not version.adapter_path or "\x00" in version.adapter_path:
        return None
    rel = PurePosixPath(version.adapter_path)
    if rel.is_absolute() or str(rel.parent) in ("", "."):
        return None
    prefix = f"{rel.parent.as_posix()}/{SAMPLES_DIRNAME}"
    try:
        artifacts.key(prefix)
    except UnsafePath:
        return None
    return prefix


def is_sample_filename(filename: str) -> bool:
    return SAMPLE_FILENAME.fullmatch(filename) is not None


def _read_manifest(artifacts: ObjectStore, prefix: str) -> dict[str, Any] | None:
    try:
        raw = artifacts.read(f"{prefix}/{SAMPLES_MANIFEST}", limit=_MANIFEST_MAX_BYTES + 1)
    except (OSError, UnsafePath):
        return None
    if len(raw) > _MANIFEST_MAX_BYTES:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _sample_rows(manifest: dict[str, Any]) -> list[SampleRow] | None:
    files = manifest.get("files")
    if not isinstance(files, list):
        return None
    rows = []
    for entry in files:
        if not isinstance(entry, dict):
            return None
        prompt, seed = entry.get("prompt"), entry.get("seed")
        parent, candidate = entry.get("parent"), entry.get("candidate")
        if (
            not isinstance(prompt, str)
            or not isinstance(seed, int)
            or isinstance(seed, bool)
            or not isinstance(parent, str)
            or not isinstance(candidate, str)
            or not is_sample_filename(parent)
            or not is_sample_filename(candidate)
        ):
            return None
        rows.append(SampleRow(prompt, seed, parent, candidate))
    return rows


def _created_at(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def get_samples(session: Session, artifacts: ObjectStore, version_id: int) -> VersionSamples:
    """The validation grid of ``version_id`` from its manifest; NotFound when the version is
    unknown or has no (readable) samples."""
    version = get_version(session, version_id)
    prefix = samples_prefix(artifacts, version)
    manifest = _read_manifest(artifacts, prefix) if prefix is not None else None
    if manifest is None:
        raise _no_samples(version_id)
    rows = _sample_rows(manifest)
    if rows is None:
        raise NotFound(f"the validation samples of version {version_id} are unreadable")
    grid = manifest.get("grid")
    return VersionSamples(
        version_id=version.id,
        parent_id=version.parent_id,
        rows=rows,
        grid=grid if isinstance(grid, str) and is_sample_filename(grid) else None,
        created_at=_created_at(manifest.get("created_at")),
    )


def sample_bytes(session: Session, artifacts: ObjectStore, version_id: int, filename: str) -> bytes:
    """One validation image of ``version_id`` (PNG bytes); NotFound for an unknown version,
    a name that is not a sample's (``parent-NN.png``, ``candidate-NN.png``, ``grid.png``), or
    a missing file."""
    if not is_sample_filename(filename):
        raise NotFound(f"no validation sample named {filename[:64]!r}")
    version = get_version(session, version_id)
    prefix = samples_prefix(artifacts, version)
    if prefix is None:
        raise _no_samples(version_id)
    try:
        return artifacts.read(f"{prefix}/{filename}")
    except (OSError, UnsafePath):  # missing, or replaced or removed since it was listed
        raise NotFound(f"version {version_id} has no validation sample {filename!r}") from None
