"""Text the database cannot store (NUL, lone surrogates, overlong) is a 422 naming the field,
in every format; a refused request leaves no row and no file behind (backend/text_input.py,
backend/staging.py)."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from backend import staging
from backend.dataset_io import ExportRecord, write_pickapic_parquet
from backend.services import images as image_service
from backend.text_input import check_text, text_problem

NUL = "a\x00b"
SURROGATE_JSON = '"a\\ud800b"'  # a lone surrogate, as JSON may carry it


def test_text_problem_names_each_kind():
    assert text_problem("plain é ✓") is None
    assert text_problem(NUL).kind == "string_nul"
    assert text_problem("a\ud800").kind == "string_unicode"
    assert text_problem("abcd", max_length=3).kind == "string_too_long"
    assert text_problem("abc", max_length=3) is None
    with pytest.raises(ValueError, match="^source: must not contain a NUL character$"):
        check_text(NUL, "source")


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def _detail_names(r, field: str) -> None:
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    text = json.dumps(detail) if not isinstance(detail, str) else detail
    assert field in text, (field, detail)


def test_login_with_nul_username_is_422_naming_username(env, client):
    r = client.post("/api/v1/auth/token", data={"username": NUL, "password": "password-123"})
    _detail_names(r, "username")
    assert r.json()["detail"][0]["loc"] == ["body", "username"]
    assert r.json()["detail"][0]["type"] == "string_nul"
    # the form still works
    assert env.login("admin", "admin-password-1").status_code == 200


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        (
            "/api/v1/auth/register",
            '{"username": "okname", "password": ' + SURROGATE_JSON + "}",
            "password",
        ),
        ("/api/v1/prompts", '[{"text": "fine", "source": "a\\u0000b"}]', "source"),
        ("/api/v1/prompts", '[{"text": "fine", "source": ' + SURROGATE_JSON + "}]", "source"),
        ("/api/v1/prompts", '[{"text": "fine", "source": "' + "s" * 129 + '"}]', "source"),
        ("/api/v1/prompts", '["a\\u0000b"]', "string_nul"),
        ("/api/v1/prompts", "[" + SURROGATE_JSON + "]", "string_unicode"),
    ],
)
def test_json_bodies_refuse_unstorable_text(env, client, path, body, field):
    before = env.counts()
    r = client.post(
        path,
        content=body.encode(),
        headers={**env.admin_headers(), "content-type": "application/json"},
    )
    _detail_names(r, field)
    assert env.counts() == before


def test_version_reject_reason_with_nul_is_422(env, client):
    vid = env.version("cand")
    r = client.post(
        f"/api/v1/versions/{vid}/reject", json={"reason": NUL}, headers=env.admin_headers()
    )
    _detail_names(r, "reason")


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        (
            "p.jsonl",
            b'{"text": "ok", "source": "a\\u0000b"}\n',
            "line 1: source: must not contain a NUL",
        ),
        (
            "p.jsonl",
            b'"ok"\n{"text": "ok2", "source": "a\\ud800"}\n',
            "line 2: source: must be valid Unicode",
        ),
        (
            "p.csv",
            b"text,source\nok,fine\nok2," + b"s" * 129 + b"\n",
            "line 3: source: must have at most 128",
        ),
        ("p.csv", b"text,source\nok,a\x00b\n", "line 2: source: must not contain a NUL"),
        ("p.txt", b"ok\nbad \x00 line\n", "line 2: text: must not contain a NUL"),
    ],
)
def test_prompt_files_refuse_unstorable_text_naming_line_and_field(
    env, client, name, data, message
):
    r = client.post(
        "/api/v1/prompts",
        headers=env.admin_headers(),
        files={"file": (name, data, "application/octet-stream")},
    )
    assert r.status_code == 422, r.text
    assert message in r.json()["detail"]
    assert env.count("prompts") == 0


@pytest.mark.parametrize(
    ("form", "filename", "message"),
    [
        ({"source": NUL}, "p.txt", "source: must not contain a NUL"),
        ({"source": "s" * 129}, "p.txt", "source: must have at most 128"),
        ({}, "n" * 200 + ".txt", "file name (the source): must have at most 128"),
    ],
)
def test_multipart_source_is_checked(env, client, form, filename, message):
    r = client.post(
        "/api/v1/prompts",
        headers=env.admin_headers(),
        data=form,
        files={"file": (filename, b"one prompt\n", "text/plain")},
    )
    assert r.status_code == 422, r.text
    assert message in r.json()["detail"]
    assert env.count("prompts") == 0


def _parquet(env, rows: list[dict]) -> bytes:
    records = [
        ExportRecord(
            caption=r.get("caption", f"caption {i}"),
            image_0=env.png(),
            image_1=env.png(),
            image_0_uid=f"{i}a",
            image_1_uid=f"{i}b",
            label_0=1.0,
            label_1=0.0,
            model_0=r.get("model_0", "m0"),
            model_1=r.get("model_1", "m1"),
            user_id=7,
            ranking_id=i,
            created_at=datetime(2026, 1, 1, tzinfo=UTC),
        )
        for i, r in enumerate(rows)
    ]
    buf = io.BytesIO()
    write_pickapic_parquet(records, buf)
    return buf.getvalue()


def _import(client, env, data: bytes):
    return client.post(
        "/api/v1/import",
        headers=env.admin_headers(),
        files={"file": ("pap.parquet", data, "application/octet-stream")},
    )


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"caption": NUL}, "row 1: caption: must not contain a NUL character"),
        ({"model_0": "m\x00"}, "row 1: model_0: must not contain a NUL character"),
        ({"model_1": "m" * 300}, "row 1: model_1: must have at most 246 characters"),
    ],
)
def test_import_with_bad_second_row_is_422_and_leaves_no_row_and_no_file(env, client, bad, message):
    root = env.state.store.root
    before_rows, before_files = env.counts(), _files(root)
    r = _import(client, env, _parquet(env, [{}, bad]))
    assert r.status_code == 422, r.text
    assert r.json()["detail"] == message
    assert env.counts() == before_rows
    assert _files(root) == before_files


def test_import_failing_while_writing_row_2_removes_row_1s_images(env, client, monkeypatch):
    """A failure after row 1's files are on disk (here: the third image write raises):
    the transaction rolls back and the staging hook deletes the files it created."""
    root = env.state.store.root
    before_rows, before_files = env.counts(), _files(root)
    real = image_service.store_image
    calls = []

    def failing(session, store, **kw):
        calls.append(1)
        if len(calls) == 3:
            assert len(staging.pending_files(session)) == 2  # row 1's two images
            raise OSError("disk full")
        return real(session, store, **kw)

    monkeypatch.setattr(image_service, "store_image", failing)
    r = _import(client, env, _parquet(env, [{}, {}]))
    assert r.json()["request_id"] == r.headers["x-request-id"]
    assert r.status_code == 500 and len(calls) == 3
    assert env.counts() == before_rows
    assert _files(root) == before_files

    monkeypatch.setattr(image_service, "store_image", real)
    r = _import(client, env, _parquet(env, [{}, {}]))
    assert r.status_code == 201, r.text
    assert len(_files(root)) == len(before_files) + 4  # committed: the files stay


def test_staging_keeps_a_file_that_a_committed_row_refers_to(env):
    """Two transactions store the same bytes; the one that created the file rolls back
    after the other committed a row for it: the file stays. (PostgreSQL only: SQLite's
    write lock lets no two writing transactions overlap.)"""
    if env.dialect == "sqlite":
        pytest.skip("SQLite serialises writing transactions")
    data = env.png()
    vid = env.base_version_id()
    env.pairs(1)  # a prompt to hang the images on
    with env.state.db.read_session() as s:
        from sqlalchemy import text

        prompt_id = s.execute(text("SELECT min(id) FROM prompts")).scalar_one()
    kw = dict(
        version_id=vid,
        prompt_id=prompt_id,
        data=data,
        seed=1,
        cfg=1.0,
        steps=1,
        sampler="x",
        width=4,
        height=4,
    )
    creator = env.state.db.write_session()
    img = image_service.store_image(creator, env.state.store, **kw)
    path = env.state.store.resolve(img.storage_path)
    assert staging.pending_files(creator) == [img.storage_path]
    with env.state.db.transaction() as other:  # stores the same content: path existed
        image_service.store_image(other, env.state.store, **kw)
        assert staging.pending_files(other) == []
    creator.rollback()
    creator.close()
    assert path.exists()
