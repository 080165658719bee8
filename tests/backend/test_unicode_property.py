"""Property: arbitrary Unicode (NUL, lone surrogates, overlong values included) in any string
field of any operation never gets a 5xx, and a refused request (4xx) changes neither the
database (row counts of every table) nor the data directory (its files).

Strings reach the server the way a client can send them: JSON escapes (``\\u0000``,
``\\ud800``), and raw bytes in forms, multipart parts and files (a lone surrogate then
becomes invalid UTF-8). Bounded: a fixed number of examples per database, no example
database, so the file runs in a few seconds per dialect.
"""

from __future__ import annotations

import io
import json
import struct
import urllib.parse
from collections.abc import Callable
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend.dataset_io import ExportRecord, write_pickapic_parquet
from backend.models import PairKind, UserRole

EXAMPLES = 120

_special = st.sampled_from(["\x00", "\ud800", "\udfff", "\ufffe", "\U0010ffff", "\u202e", "'"])
_any_char = st.one_of(st.characters(), _special)
TEXT = st.one_of(
    st.lists(_any_char, max_size=20).map("".join),
    st.tuples(st.sampled_from("ab\x00"), st.integers(60, 2100)).map(lambda t: t[0] * t[1]),
)


def _raw(s: str) -> bytes:
    """The UTF-8 bytes of ``s``, lone surrogates passed through as invalid bytes."""
    return s.encode("utf-8", "surrogatepass")


def _json(client, method, path, headers, body):
    return client.request(
        method,
        path,
        content=json.dumps(body).encode(),  # ASCII: surrogates and NUL as \\u escapes
        headers={**headers, "content-type": "application/json"},
    )


def _form(client, path, fields: dict[str, str]):
    body = urllib.parse.urlencode({k: _raw(v) for k, v in fields.items()})
    return client.post(
        path, content=body, headers={"content-type": "application/x-www-form-urlencoded"}
    )


def _unchecked_utf8(data: bytes) -> pa.Array:
    """A one-string arrow array holding ``data`` as is (invalid UTF-8 included), as a
    hostile file could."""
    offsets = pa.py_buffer(struct.pack("<ii", 0, len(data)))
    return pa.Array.from_buffers(pa.string(), 1, [None, offsets, pa.py_buffer(data)])


def _parquet(env, caption: str, model: str) -> bytes:
    rec = ExportRecord(
        caption="placeholder",
        image_0=env.png(),
        image_1=env.png(),
        image_0_uid="a",
        image_1_uid="b",
        label_0=1.0,
        label_1=0.0,
        model_0="placeholder",
        model_1="m1",
        user_id=3,
        ranking_id=1,
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
    )
    buf = io.BytesIO()
    write_pickapic_parquet([rec], buf)
    table = pq.read_table(io.BytesIO(buf.getvalue()))
    for column, value in (("caption", caption), ("model_0", model)):
        i = table.schema.get_field_index(column)
        table = table.set_column(i, column, _unchecked_utf8(_raw(value)))
    out = io.BytesIO()
    pq.write_table(table, out)
    return out.getvalue()


def _operations(env, admin, ann, ann_id, version_id, pair_id) -> dict[str, Callable]:
    c = env.client

    def multipart(s: str, where: str):
        files = {
            "txt": ("p.txt", _raw(s) + b"\n", "text/plain"),
            "csv": ("p.csv", b"text,source\nfine," + _raw(s) + b"\n", "text/csv"),
            "jsonl": ("p.jsonl", json.dumps({"text": s}).encode() + b"\n", "application/jsonl"),
            "name": (s, b"one prompt\n", "text/plain"),
        }
        data = {"source": _raw(s)} if where == "source" else {}
        key = where if where in files else "txt"
        return c.post("/api/v1/prompts", headers=admin, data=data, files={"file": files[key]})

    return {
        "login.username": lambda s: _form(
            c, "/api/v1/auth/token", {"username": s, "password": "x"}
        ),
        "login.password": lambda s: _form(
            c, "/api/v1/auth/token", {"username": "admin", "password": s}
        ),
        "register.username": lambda s: _json(
            c, "POST", "/api/v1/auth/register", {}, {"username": s, "password": "password-1"}
        ),
        "register.password": lambda s: _json(
            c, "POST", "/api/v1/auth/register", {}, {"username": "newbie", "password": s}
        ),
        "register.invite_code": lambda s: _json(
            c,
            "POST",
            "/api/v1/auth/register",
            {},
            {"username": "invitee", "password": "password-1", "invite_code": s},
        ),
        "users.create": lambda s: _json(
            c, "POST", "/api/v1/users", admin, {"username": s, "password": s}
        ),
        "users.patch.password": lambda s: _json(
            c, "PATCH", f"/api/v1/users/{ann_id}", admin, {"password": s}
        ),
        "prompts.json.text": lambda s: _json(c, "POST", "/api/v1/prompts", admin, [s]),
        "prompts.json.object": lambda s: _json(
            c, "POST", "/api/v1/prompts", admin, [{"text": "a prompt", "source": s}]
        ),
        "prompts.txt": lambda s: multipart(s, "txt"),
        "prompts.csv": lambda s: multipart(s, "csv"),
        "prompts.jsonl": lambda s: multipart(s, "jsonl"),
        "prompts.source": lambda s: multipart(s, "source"),
        "prompts.filename": lambda s: multipart(s, "name"),
        "votes.client_vote_id": lambda s: _json(
            c,
            "POST",
            "/api/v1/votes",
            ann,
            {"pair_id": pair_id, "choice": "left", "client_vote_id": s},
        ),
        "versions.reject": lambda s: _json(
            c, "POST", f"/api/v1/versions/{version_id}/reject", admin, {"reason": s}
        ),
        "rounds.config.value": lambda s: _json(
            c, "POST", "/api/v1/rounds", admin, {"config": {"loss": s}}
        ),
        "rounds.config.key": lambda s: _json(
            c, "POST", "/api/v1/rounds", admin, {"config": {s: 1}}
        ),
        "import.caption": lambda s: c.post(
            "/api/v1/import",
            headers=admin,
            files={"file": ("x.parquet", _parquet(env, s, "m0"), "application/octet-stream")},
        ),
        "import.model": lambda s: c.post(
            "/api/v1/import",
            headers=admin,
            files={
                "file": ("x.parquet", _parquet(env, "a caption", s), "application/octet-stream")
            },
        ),
        "query.prompts.active": lambda s: c.get(
            "/api/v1/prompts", params={"active": _raw(s)}, headers=ann
        ),
        "query.export.format": lambda s: c.get(
            "/api/v1/export", params={"format": _raw(s)}, headers=admin
        ),
        "query.image.sig": lambda s: c.get("/api/v1/images/1", params={"sig": _raw(s)}),
        "path.sample.filename": lambda s: c.get(
            f"/api/v1/versions/{version_id}/samples/" + urllib.parse.quote(_raw(s), safe=""),
            headers=admin,
        ),
    }


def _data_files(env) -> dict[str, int]:
    root = env.state.settings.data_dir
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def test_arbitrary_unicode_in_every_string_field(env):
    admin = env.admin_headers()
    ann_id, ann = env.user("ann", UserRole.annotator)
    (pair_id, _, _), *_ = env.pairs(2)
    env.pairs(1, PairKind.gold)
    version_id = env.version("cand")
    ops = _operations(env, admin, ann, ann_id, version_id, pair_id)
    failures: list[str] = []
    seen: dict[int, int] = {}

    @given(name=st.sampled_from(sorted(ops)), value=TEXT)
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    def check(name: str, value: str) -> None:
        env.state.login_limiter.reset()
        env.state.register_limiter.reset()
        rows, files = env.counts(), _data_files(env)
        r = ops[name](value)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        where = f"{name} {value[:40]!r} -> {r.status_code}"
        if r.status_code >= 500:
            failures.append(f"{where}: {r.text[:200]}")
        elif 400 <= r.status_code < 500:
            if env.counts() != rows:
                failures.append(f"{where}: refused but changed rows")
            if _data_files(env) != files:
                failures.append(f"{where}: refused but changed the data directory")

    check()
    assert not failures, "\n".join(failures[:20])
    # the property was exercised on both sides: refusals and acceptances
    assert any(400 <= code < 500 for code in seen) and any(code < 300 for code in seen), seen
