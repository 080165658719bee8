"""GET /api/v1/versions/{id}/samples and /samples/{filename}: the validation grid a round
rendered beside the version's adapter (worker/validation_grid.py), served to admins."""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import update

from backend.models import ModelVersion, UserRole


def _png(colour: tuple[int, int, int], size: int = 4) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def _version_with_adapter(env, name: str | None = None) -> tuple[int, Path]:
    """A candidate version (child of the base) whose adapter path is under models_dir, as a
    round publishes it; returns its id and its samples directory (not created)."""
    name = name or f"round-{uuid.uuid4().hex[:8]}"
    vid = env.version(name, parent_id=env.base_version_id())
    rel = f"versions/{name}/adapter.safetensors"
    with env.state.db.transaction() as s:
        s.execute(update(ModelVersion).where(ModelVersion.id == vid).values(adapter_path=rel))
    models_dir = env.state.settings.models_dir
    (models_dir / rel).parent.mkdir(parents=True, exist_ok=True)
    (models_dir / rel).write_bytes(b"adapter weights")
    return vid, models_dir / "versions" / name / "samples"


def _write_samples(dest: Path) -> dict[str, bytes]:
    files = {
        "parent-00.png": _png((255, 0, 0)),
        "candidate-00.png": _png((0, 0, 255)),
        "grid.png": _png((0, 255, 0), 8),
    }
    dest.mkdir(parents=True)
    for name, data in files.items():
        (dest / name).write_bytes(data)
    manifest = {
        "format": 1,
        "prompts": ["a red circle"],
        "seeds": [4321],
        "files": [
            {
                "prompt": "a red circle",
                "seed": 4321,
                "parent": "parent-00.png",
                "candidate": "candidate-00.png",
            }
        ],
        "grid": "grid.png",
        "created_at": "2025-01-02T03:04:05+00:00",
    }
    (dest / "samples.json").write_text(json.dumps(manifest))
    return files


def test_samples_listing_and_files_for_admin(env, client):
    vid, dest = _version_with_adapter(env)
    files = _write_samples(dest)
    admin = env.admin_headers()

    r = client.get(f"/api/v1/versions/{vid}/samples", headers=admin)
    assert r.status_code == 200, r.text
    base = f"/api/v1/versions/{vid}/samples"
    assert r.json() == {
        "version_id": vid,
        "parent_id": env.base_version_id(),
        "prompts": [
            {
                "prompt": "a red circle",
                "seed": 4321,
                "parent_url": f"{base}/parent-00.png",
                "candidate_url": f"{base}/candidate-00.png",
            }
        ],
        "grid_url": f"{base}/grid.png",
        "created_at": "2025-01-02T03:04:05Z",
    }

    for name, data in files.items():
        r = client.get(f"{base}/{name}", headers=admin)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "image/png"
        assert r.content == data
        assert r.headers["cache-control"].startswith("private")
        etag = r.headers["etag"]
        again = client.get(f"{base}/{name}", headers={**admin, "If-None-Match": etag})
        assert again.status_code == 304
        assert again.content == b""


def test_samples_are_admin_only(env, client):
    vid, dest = _version_with_adapter(env)
    _write_samples(dest)
    _, annotator = env.user("ann", UserRole.annotator)
    for url in (f"/api/v1/versions/{vid}/samples", f"/api/v1/versions/{vid}/samples/grid.png"):
        assert client.get(url, headers=annotator).status_code == 403
        assert client.get(url).status_code == 401


def test_unknown_version_is_404(env, client):
    admin = env.admin_headers()
    r = client.get("/api/v1/versions/999999/samples", headers=admin)
    assert r.status_code == 404
    assert r.json() == {"detail": "version 999999 not found"}
    r = client.get("/api/v1/versions/999999/samples/grid.png", headers=admin)
    assert r.status_code == 404


def test_version_without_samples_is_404_with_the_reason(env, client):
    admin = env.admin_headers()
    base_id = env.base_version_id()  # no adapter at all
    vid, _ = _version_with_adapter(env)  # an adapter, but no samples directory
    for v in (base_id, vid):
        r = client.get(f"/api/v1/versions/{v}/samples", headers=admin)
        assert r.status_code == 404
        assert r.json()["detail"] == (
            f"version {v} has no validation samples "
            "(it was made before rounds rendered them, or by import)"
        )
        r = client.get(f"/api/v1/versions/{v}/samples/grid.png", headers=admin)
        assert r.status_code == 404


@pytest.mark.parametrize(
    "filename",
    [
        "..%2Fadapter.safetensors",
        "..%2F..%2Fprefloop.db",
        "%2E%2E",
        "x.png",
        "samples.json",
        "parent-0.png",
        "parent-000.png",
        "grid.png.bak",
        "grid.PNG",
        "parent-%D9%A1%D9%A2.png",  # Arabic-Indic digits
        "grid.png%0A",
        "grid.png%00",
    ],
)
def test_bad_filenames_are_404(env, client, filename):
    vid, dest = _version_with_adapter(env)
    _write_samples(dest)
    (dest / "x.png").write_bytes(_png((1, 2, 3)))
    r = client.get(f"/api/v1/versions/{vid}/samples/{filename}", headers=env.admin_headers())
    assert r.status_code == 404, r.text
    assert r.headers["content-type"].startswith("application/json")


def test_missing_file_and_broken_manifest_are_404(env, client):
    admin = env.admin_headers()
    vid, dest = _version_with_adapter(env)
    _write_samples(dest)
    assert (
        client.get(f"/api/v1/versions/{vid}/samples/parent-07.png", headers=admin).status_code
        == 404
    )
    (dest / "samples.json").write_text("{not json")
    r = client.get(f"/api/v1/versions/{vid}/samples", headers=admin)
    assert r.status_code == 404
    (dest / "samples.json").write_text(
        json.dumps({"files": [{"prompt": "p", "seed": 1, "parent": "../x", "candidate": "y"}]})
    )
    r = client.get(f"/api/v1/versions/{vid}/samples", headers=admin)
    assert r.status_code == 404
    assert "unreadable" in r.json()["detail"]


def test_adapter_path_outside_models_dir_is_never_followed(env, client):
    admin = env.admin_headers()
    for rel in (
        "../../outside/adapter.safetensors",
        "/etc/adapter.safetensors",
        "adapter.safetensors",
    ):
        vid = env.version(f"evil-{uuid.uuid4().hex[:6]}")
        with env.state.db.transaction() as s:
            s.execute(update(ModelVersion).where(ModelVersion.id == vid).values(adapter_path=rel))
        r = client.get(f"/api/v1/versions/{vid}/samples", headers=admin)
        assert r.status_code == 404
        r = client.get(f"/api/v1/versions/{vid}/samples/grid.png", headers=admin)
        assert r.status_code == 404


def test_worker_written_grid_is_served(env, client):
    """The worker's writer and the API's reader agree on the layout and the manifest."""
    import numpy as np

    from worker.validation_grid import render_validation_grid

    def solid(value):
        return lambda prompts, seeds: [np.full((8, 8, 3), value, np.uint8) for _ in prompts]

    vid, dest = _version_with_adapter(env)
    manifest = render_validation_grid(solid(200), solid(50), ["a", "b"], [4321, 4322], dest)
    admin = env.admin_headers()
    r = client.get(f"/api/v1/versions/{vid}/samples", headers=admin)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [p["prompt"] for p in body["prompts"]] == manifest["prompts"]
    assert [p["seed"] for p in body["prompts"]] == manifest["seeds"]
    for url in [body["grid_url"]] + [
        p[k] for p in body["prompts"] for k in ("parent_url", "candidate_url")
    ]:
        r = client.get(url, headers=admin)
        assert r.status_code == 200
        assert r.content == (dest / url.rsplit("/", 1)[1]).read_bytes()
