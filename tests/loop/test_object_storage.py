"""Object storage (``PREFLOOP_STORAGE_URL=s3://...``, backend/storage.py) against a real
S3-compatible server on loopback: moto's server mode (``moto.server.ThreadedMotoServer``),
started by these tests on 127.0.0.1, spoken to over HTTP by s3fs exactly as a MinIO or AWS
endpoint would be.

- The round trip: the pair pool stores its images in the bucket, the API serves them (and a
  version's validation grid) from there, a round reads its snapshot images from there and
  publishes its adapter there, and the worker's loader reads it back (checked by SHA-256).
- Publishing stays atomic: a publish that dies after its upload leaves no version (and the
  retry removes its files), and an interrupted multipart upload leaves no object, nor a
  changed one.
"""

from __future__ import annotations

import hashlib
import logging
import re
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import boto3
import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import select

from backend.main import create_app
from backend.models import Choice, Image, ModelVersion, Prompt, RoundStatus, TrainingRound
from backend.services import images as image_service
from backend.services import versions as version_service
from backend.settings import Settings
from backend.storage import ObjectStore, UnsafePath, artifact_store, image_store, object_store
from worker import model_registry, pair_pool, rounds

ADMIN_PASSWORD = "s3-test-admin-password"
PREFIX = "loop"
CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on a free loopback port, for this module."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def _client(endpoint: str) -> Any:
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **CREDENTIALS)


@pytest.fixture
def bucket(s3_endpoint: str) -> str:
    name = f"prefloop-{uuid.uuid4().hex[:12]}"
    _client(s3_endpoint).create_bucket(Bucket=name)
    return name


def _s3(endpoint: str, bucket: str) -> dict[str, Any]:
    return {
        "storage_url": f"s3://{bucket}/{PREFIX}",
        "s3_endpoint_url": endpoint,
        "s3_region": "us-east-1",
        "s3_access_key_id": "testing",
        "s3_secret_access_key": "testing",
        "admin_password": ADMIN_PASSWORD,
        "argon2_time_cost": 1,
        "argon2_memory_kib": 64,
    }


def _keys(endpoint: str, bucket: str, prefix: str = "") -> list[str]:
    keys: list[str] = []
    pages = (
        _client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    )
    for page in pages:
        keys += [o["Key"] for o in page.get("Contents", [])]
    return sorted(keys)


def _get(endpoint: str, bucket: str, key: str) -> bytes:
    return bytes(_client(endpoint).get_object(Bucket=bucket, Key=key)["Body"].read())


def _versions_of(db: Any, round_id: int) -> list[ModelVersion]:
    with db.read_session() as s:
        return list(
            s.scalars(select(ModelVersion).where(ModelVersion.created_by_round == round_id))
        )


def _voted(make_env: Any, loop: Any, endpoint: str, bucket: str) -> tuple[Settings, Any]:
    settings, db = make_env(**_s3(endpoint, bucket))
    assert settings.storage_url == f"s3://{bucket}/{PREFIX}" and not settings.storage_is_local
    assert pair_pool.refill_pool(db.write_session, settings, seed=0) > 0
    user = loop.add_annotator(db)
    loop.vote_on_within_pairs(db, user, choices=[Choice.left, Choice.right])
    return settings, db


def _differs_from_parent(new: Any, parent: Any) -> bool:
    cond = parent.encode_prompts(["a small red circle on a blue background, top left"])
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    with torch.no_grad():
        return not torch.allclose(new.predict_noise(x, t, cond), parent.predict_noise(x, t, cond))


# ------------------------------------------------------------------------------ the round trip
def test_images_and_adapters_round_trip_through_s3(
    make_env: Any, loop: Any, s3_endpoint: str, bucket: str
) -> None:
    settings, db = _voted(make_env, loop, s3_endpoint, bucket)

    # 1. The pool's images are in the bucket, named by their content; none on local disk.
    with db.read_session() as s:
        images = list(s.scalars(select(Image).order_by(Image.id)))
    stored = _keys(s3_endpoint, bucket, f"{PREFIX}/images/")
    assert stored == sorted({f"{PREFIX}/images/{im.storage_path}" for im in images})
    for im in images[:4]:
        data = _get(s3_endpoint, bucket, f"{PREFIX}/images/{im.storage_path}")
        assert hashlib.sha256(data).hexdigest() == im.sha256
    assert not settings.images_dir.exists()

    # 2. The API serves them from the bucket (signed URL; then the process's cache; 304).
    app = create_app(settings, loop.RecordingDispatcher())
    state = app.state.prefloop
    with TestClient(app) as client:
        im = images[0]
        r = client.get(state.signer.url(im.id))
        assert r.status_code == 200, r.text
        assert hashlib.sha256(r.content).hexdigest() == im.sha256
        assert r.headers["content-type"] == im.media_type
        assert r.headers["etag"] == f'"{im.sha256}"'
        assert state.store.cache is not None and state.store.cache.hits == 0
        assert client.get(state.signer.url(im.id)).content == r.content
        assert state.store.cache.hits == 1
        r304 = client.get(state.signer.url(im.id), headers={"If-None-Match": f'"{im.sha256}"'})
        assert r304.status_code == 304
        assert client.get(f"/api/v1/images/{im.id}").status_code == 401

    # 3. A round reads its snapshot images from the bucket and publishes its adapter there.
    round_id = loop.create_round(db)
    rounds.run_round(round_id, db.write_session, settings, task_id="s3-task")
    with db.read_session() as s:
        rnd = s.get(TrainingRound, round_id)
        assert RoundStatus(rnd.status) == RoundStatus.succeeded, rnd.error
    (version,) = _versions_of(db, round_id)
    assert re.fullmatch(
        rf"versions/round-{round_id}/a1-[0-9a-f]{{12}}/adapter\.safetensors", version.adapter_path
    )
    key = f"{PREFIX}/models/{version.adapter_path}"
    adapter = _get(s3_endpoint, bucket, key)
    assert hashlib.sha256(adapter).hexdigest() == version.adapter_sha256
    prefix = f"{PREFIX}/models/{PurePosixPath(version.adapter_path).parent}"
    published = _keys(s3_endpoint, bucket, f"{PREFIX}/models/")
    assert key in published and f"{prefix}/samples/samples.json" in published
    assert all(k.startswith(f"{prefix}/") for k in published), published
    # Nothing of the version on local disk: only the (removed) work directory was local.
    assert not (settings.models_dir / "versions").exists()
    assert not rounds.work_dir(settings, round_id).exists()

    # 4. The worker's loader reads it back: downloaded once, checked, fused.
    model_registry.clear_cache()
    artifacts = artifact_store(settings)
    with db.read_session() as s:
        new = model_registry.load_version(s, version.id, models_dir=artifacts)
        parent = model_registry.load_version(s, version.parent_id, models_dir=artifacts)
    cached = settings.data_dir / "cache" / "artifacts" / f"{version.adapter_sha256}.safetensors"
    assert cached.read_bytes() == adapter
    assert _differs_from_parent(new, parent)

    # 5. The API serves the version's validation grid from the bucket.
    with TestClient(create_app(settings, loop.RecordingDispatcher())) as client:
        token = client.post(
            "/api/v1/auth/token",
            data={"username": settings.admin_username, "password": ADMIN_PASSWORD},
        ).json()["access_token"]
        auth = {"Authorization": f"Bearer {token}"}
        body = client.get(f"/api/v1/versions/{version.id}/samples", headers=auth).json()
        assert body["prompts"] and body["grid_url"]
        grid = client.get(body["grid_url"], headers=auth)
        assert grid.status_code == 200 and grid.headers["content-type"] == "image/png"
        assert grid.content == _get(s3_endpoint, bucket, f"{prefix}/samples/grid.png")

    # 6. An adapter changed in the bucket is refused (and its bytes not cached under the sha).
    _client(s3_endpoint).put_object(Bucket=bucket, Key=key, Body=adapter[:-8] + b"tampered")
    cached.unlink()
    model_registry.clear_cache()
    with (
        db.read_session() as s,
        pytest.raises(model_registry.AdapterIntegrityError, match="refusing to load it"),
    ):
        model_registry.load_version(s, version.id, models_dir=artifacts)
    assert not cached.exists()


# ------------------------------------------------------------------------------ atomic publishing
class _Killed(BaseException):
    """Stands for SIGKILL: passes every ``except Exception`` on its way out."""


def test_a_publish_that_dies_after_its_upload_is_never_visible(
    make_env: Any, loop: Any, s3_endpoint: str, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, db = _voted(make_env, loop, s3_endpoint, bucket)
    round_id = loop.create_round(db)
    real_upload = rounds._upload_adapter

    def upload_then_die(artifacts: ObjectStore, src: Path, rel: str) -> str:
        real_upload(artifacts, src, rel)
        raise _Killed

    monkeypatch.setattr(rounds, "_upload_adapter", upload_then_die)
    with pytest.raises(_Killed):
        rounds.run_round(round_id, db.write_session, settings, task_id="s3-task")

    # The adapter (and its samples) are in the bucket, but no row names them: invisible.
    base = f"{PREFIX}/models/versions/round-{round_id}/"
    dead = _keys(s3_endpoint, bucket, base)
    assert any(k.endswith("/adapter.safetensors") for k in dead), dead
    assert _versions_of(db, round_id) == []
    with db.read_session() as s:
        rows = list(s.scalars(select(ModelVersion)))
        assert all(v.adapter_path is None for v in rows)  # the base version only
        rnd = s.get(TrainingRound, round_id)
        assert RoundStatus(rnd.status) == RoundStatus.evaluating and rnd.version_id is None
    with TestClient(create_app(settings, loop.RecordingDispatcher())) as client:
        token = client.post(
            "/api/v1/auth/token",
            data={"username": settings.admin_username, "password": ADMIN_PASSWORD},
        ).json()["access_token"]
        listed = client.get("/api/v1/versions", headers={"Authorization": f"Bearer {token}"})
        assert listed.status_code == 200
        assert {v["name"] for v in listed.json()["data"]} == {v.name for v in rows}

    # The task's redelivery publishes under a new prefix and removes the dead attempt's files.
    monkeypatch.setattr(rounds, "_upload_adapter", real_upload)
    rounds.run_round(round_id, db.write_session, settings, task_id="s3-task")
    (version,) = _versions_of(db, round_id)
    prefix = f"{PREFIX}/models/{PurePosixPath(version.adapter_path).parent}/"
    left = _keys(s3_endpoint, bucket, base)
    assert left and all(k.startswith(prefix) for k in left), left
    assert not set(dead) & set(left)
    model_registry.clear_cache()
    with db.read_session() as s:
        model_registry.load_version(s, version.id, models_dir=artifact_store(settings))


def test_an_interrupted_multipart_upload_leaves_no_object_and_the_old_one_whole(
    s3_endpoint: str, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import s3fs.core

    settings = Settings(data_dir=tmp_path, **_s3(s3_endpoint, bucket))
    store = artifact_store(settings)
    old = b"the complete old adapter"
    store.put_bytes("versions/x/adapter.safetensors", old)

    # 5 MiB parts (S3's minimum), and the second part's upload fails: a dropped connection.
    monkeypatch.setattr(s3fs.core, "calculate_chunksize", lambda size, chunksize=None: 5 << 20)
    real_call = store.fs._call_s3
    parts: list[int] = []

    async def flaky_call(method: str, *args: Any, **kwargs: Any) -> Any:
        if method == "upload_part":
            parts.append(kwargs["PartNumber"])
            if len(parts) == 2:
                raise ConnectionError("connection reset during part 2")
        return await real_call(method, *args, **kwargs)

    monkeypatch.setattr(store.fs, "_call_s3", flaky_call)
    big = tmp_path / "big.safetensors"
    big.write_bytes(bytes(range(256)) * (11 << 12))  # 11 MiB: three parts

    with pytest.raises(Exception, match="connection reset"):
        store.put_file("versions/y/adapter.safetensors", big)
    assert not store.exists("versions/y/adapter.safetensors")
    with pytest.raises(FileNotFoundError):
        store.fetch("versions/y/adapter.safetensors")
    with pytest.raises(Exception, match="connection reset"):
        parts.clear()
        store.put_file("versions/x/adapter.safetensors", big)
    assert store.read("versions/x/adapter.safetensors") == old
    uploads = _client(s3_endpoint).list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert uploads == []  # aborted, not left to linger

    monkeypatch.setattr(store.fs, "_call_s3", real_call)
    store.put_file("versions/y/adapter.safetensors", big)  # and a whole one goes through
    assert (
        store.sha256("versions/y/adapter.safetensors")
        == hashlib.sha256(big.read_bytes()).hexdigest()
    )


# ------------------------------------------------------------------------------ the store itself
def test_images_of_a_rolled_back_transaction_are_deleted_from_the_bucket(
    make_env: Any, s3_endpoint: str, bucket: str
) -> None:
    settings, db = make_env(**_s3(s3_endpoint, bucket))
    store = image_store(settings)
    with db.transaction() as s:
        base = version_service.ensure_base_version(s, settings.base_model)
        prompt = Prompt(text="a red circle", source="test")
        s.add(prompt)
        s.flush()
        ids = (base.id, prompt.id)
    png = _png()
    with db.write_session() as s:
        row = image_service.store_image(
            s,
            store,
            version_id=ids[0],
            prompt_id=ids[1],
            data=png,
            seed=1,
            cfg=1.0,
            steps=1,
            sampler="x",
            width=4,
            height=4,
        )
        rel = row.storage_path
        assert _get(s3_endpoint, bucket, f"{PREFIX}/images/{rel}") == png
        s.rollback()
    assert _keys(s3_endpoint, bucket, f"{PREFIX}/images/") == []
    assert list(store.iter_files()) == []


def test_s3_keys_cannot_leave_the_root_and_presigned_urls_work(
    s3_endpoint: str, bucket: str, tmp_path: Path
) -> None:
    import httpx

    store = object_store(Settings(data_dir=tmp_path, **_s3(s3_endpoint, bucket)))
    assert store.url == f"s3://{bucket}/{PREFIX}"
    for bad in ("../x", "a/../../x", "/etc/passwd", "a\x00b", "", ".", "a\\b"):
        with pytest.raises(UnsafePath):
            store.key(bad)
    store.put_bytes("images/ab/cd/x.png", b"bytes")
    url = store.presign("images/ab/cd/x.png", expires_s=60)
    assert url is not None and url.startswith(s3_endpoint)
    assert "Signature=" in url and "Expires=" in url  # (moto does not check signatures)
    assert httpx.get(url).content == b"bytes"


def test_credentials_come_from_the_aws_variables_when_not_set(
    s3_endpoint: str, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = _s3(s3_endpoint, bucket)
    del values["s3_access_key_id"], values["s3_secret_access_key"]
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "testing")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    settings = Settings(data_dir=tmp_path, **values)
    store = object_store(settings)
    assert "key" not in store.fs.storage_options
    store.put_bytes("probe", b"ok")
    assert _get(s3_endpoint, bucket, f"{PREFIX}/probe") == b"ok"


def test_local_storage_keeps_the_data_dir_layout(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert settings.storage_is_local
    images, artifacts = image_store(settings), artifact_store(settings)
    assert images.root == (tmp_path / "images").resolve()
    assert Path(artifacts.root) == settings.models_dir.resolve()
    rel, digest = images.save(_png(), "image/png")
    assert (tmp_path / "images" / rel).read_bytes() == _png()
    assert rel == f"{digest[:2]}/{digest[2:4]}/{digest}.png"
    (tmp_path / "images" / "link").symlink_to("/etc")
    with pytest.raises(UnsafePath):
        images.read("link/passwd")


def _png() -> bytes:
    import io

    from PIL import Image as PILImage

    buf = io.BytesIO()
    PILImage.new("RGB", (4, 4), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()
