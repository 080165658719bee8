"""Prompts: JSON lists, file uploads (txt/csv/jsonl), all-or-nothing, size limits."""

from __future__ import annotations

import json

import pytest


def _upload(client, headers, name, data, ctype="application/octet-stream"):
    return client.post("/api/v1/prompts", headers=headers, files={"file": (name, data, ctype)})


def test_json_list_adds_prompts_and_skips_existing(env, client):
    h = env.admin_headers()
    r = client.post(
        "/api/v1/prompts",
        headers=h,
        json=["a red circle", {"text": "a blue square", "source": "set-1"}, "a red circle"],
    )
    assert r.status_code == 201, r.text
    assert r.json() == {"created": 2, "existing": 1}
    r = client.post("/api/v1/prompts", headers=h, json=["a red circle", "a green star"])
    assert r.json() == {"created": 1, "existing": 1}
    page = client.get("/api/v1/prompts?limit=2", headers=h).json()
    assert page["count"] == 3 and len(page["data"]) == 2
    assert page["data"][0]["text"] == "a red circle"
    page2 = client.get("/api/v1/prompts?offset=2&limit=2", headers=h).json()
    assert [p["text"] for p in page2["data"]] == ["a green star"]


def test_annotators_can_list_prompts(env, client):
    _, h = env.user()
    assert client.get("/api/v1/prompts", headers=h).status_code == 200


@pytest.mark.parametrize(
    ("name", "data", "expected"),
    [
        ("p.txt", b"a red circle\n\n  a blue   square  \n", ["a red circle", "a blue square"]),
        (
            "p.csv",
            b'id,text,source\n1,a red circle,s\n2,"a blue, square",\n',
            ["a red circle", "a blue, square"],
        ),
        ("p.csv", b"a red circle\na blue square\n", ["a red circle", "a blue square"]),
        (
            "p.jsonl",
            b'"a red circle"\n{"prompt": "a blue square"}\n\n',
            ["a red circle", "a blue square"],
        ),
    ],
)
def test_file_uploads(env, client, name, data, expected):
    h = env.admin_headers()
    r = _upload(client, h, name, data)
    assert r.status_code == 201, r.text
    assert r.json()["created"] == len(expected)
    texts = [p["text"] for p in client.get("/api/v1/prompts", headers=h).json()["data"]]
    assert texts == expected


@pytest.mark.parametrize(
    ("name", "data", "line"),
    [
        ("p.jsonl", b'"ok one"\n"ok two"\n{broken\n"ok four"\n', 3),
        ("p.jsonl", b'"ok"\n{"nope": 1}\n', 2),
        ("p.csv", b"text,source\nok,a\nbad,row,extra\n", 3),
        ("p.txt", b"fine\nalso fine\n" + b"x" * 2001 + b"\n", 3),
        ("p.txt", b"fine\n\xff\xfe broken\n", 2),
    ],
)
def test_broken_file_is_422_with_the_line_and_writes_nothing(env, client, name, data, line):
    h = env.admin_headers()
    r = _upload(client, h, name, data)
    assert r.status_code == 422, r.text
    assert f"line {line}" in r.json()["detail"]
    assert env.count("prompts") == 0


def test_unknown_file_type_and_empty_file_are_422(env, client):
    h = env.admin_headers()
    assert _upload(client, h, "p.exe", b"x").status_code == 422
    assert _upload(client, h, "p.txt", b"\n\n").status_code == 422
    assert env.count("prompts") == 0


def test_upload_over_the_limit_is_413_and_writes_nothing(env, client):
    h = env.admin_headers()
    limit = env.state.settings.max_upload_bytes
    big = b"".join(b"prompt number %d\n" % i for i in range(limit // 10))
    assert len(big) > limit
    r = _upload(client, h, "big.txt", big)
    assert r.status_code == 413
    assert r.json()["detail"].startswith("request body too large")
    r = client.post(
        "/api/v1/prompts",
        headers={**h, "Content-Type": "application/json"},
        content=json.dumps([f"p{i}" for i in range(limit // 4)]).encode(),
    )
    assert r.status_code == 413
    assert env.count("prompts") == 0


def test_streamed_body_without_length_over_the_limit_is_413(env, client):
    h = env.admin_headers()
    limit = env.state.settings.max_upload_bytes

    def chunks():
        for i in range(limit // 1000 + 10):
            yield (b'"p%06d",' % i) * 100

    r = client.post(
        "/api/v1/prompts", headers={**h, "Content-Type": "application/json"}, content=chunks()
    )
    assert r.status_code == 413
    assert env.count("prompts") == 0


@pytest.mark.parametrize(
    "body", [[], [""], [{"text": ""}], [{"text": "x", "bogus": 1}], {"text": "x"}, [1]]
)
def test_invalid_json_lists_are_422(env, client, body):
    r = client.post("/api/v1/prompts", headers=env.admin_headers(), json=body)
    assert r.status_code == 422
    assert env.count("prompts") == 0


def test_unsupported_media_type_is_415(env, client):
    r = client.post(
        "/api/v1/prompts",
        headers={**env.admin_headers(), "Content-Type": "text/xml"},
        content=b"<x/>",
    )
    assert r.status_code == 415


def test_admins_activate_and_deactivate_prompts(env, client):
    h = env.admin_headers()
    r = client.post("/api/v1/prompts", json=["a red cube", "a blue cone"], headers=h)
    assert r.status_code == 201
    rows = client.get("/api/v1/prompts", headers=h).json()["data"]
    cube = next(p["id"] for p in rows if p["text"] == "a red cube")

    r = client.patch(f"/api/v1/prompts/{cube}", json={"active": False}, headers=h)
    assert r.status_code == 200 and (r.json()["id"], r.json()["active"]) == (cube, False)
    inactive = client.get("/api/v1/prompts?active=false", headers=h).json()
    assert [p["text"] for p in inactive["data"]] == ["a red cube"] and inactive["count"] == 1
    r = client.patch(f"/api/v1/prompts/{cube}", json={"active": True}, headers=h)
    assert r.json()["active"] is True
    assert client.get("/api/v1/prompts?active=false", headers=h).json()["count"] == 0

    assert client.patch("/api/v1/prompts/987654", json={"active": False}, headers=h).json() == {
        "detail": "prompt 987654 not found"
    }
    assert (
        client.patch(f"/api/v1/prompts/{cube}", json={"activ": False}, headers=h).status_code == 422
    )
    _, ann = env.user()
    assert (
        client.patch(f"/api/v1/prompts/{cube}", json={"active": False}, headers=ann).status_code
        == 403
    )
