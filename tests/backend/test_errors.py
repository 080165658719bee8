"""Every 5xx carries the request id in its body and ``X-Request-ID``, and the logged lines
(the traceback and the access line) carry the same id."""

from __future__ import annotations

import io
import json
import logging

import pytest
from sqlalchemy.exc import OperationalError

from backend.observability import JsonFormatter
from backend.services import users as user_service


@pytest.fixture
def json_log():
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(JsonFormatter())
    loggers = [logging.getLogger("prefloop.errors"), logging.getLogger("prefloop.access")]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    yield lambda: [json.loads(line) for line in buf.getvalue().splitlines()]
    for lg, level in zip(loggers, old, strict=True):
        lg.removeHandler(handler)
        lg.setLevel(level)


def _boom(*args, **kwargs):
    raise RuntimeError("boom")


def test_unhandled_error_is_500_with_the_logged_request_id(env, client, monkeypatch, json_log):
    monkeypatch.setattr(user_service, "list_users_with_stats", _boom)
    r = client.get("/api/v1/users", headers=env.admin_headers())
    assert r.status_code == 500
    rid = r.headers["x-request-id"]
    assert len(rid) == 32
    assert r.json() == {"detail": "internal server error", "request_id": rid}
    lines = json_log()
    tb = [x for x in lines if x["logger"] == "prefloop.errors"]
    assert len(tb) == 1 and tb[0]["request_id"] == rid and "RuntimeError: boom" in tb[0]["exc"]
    access = [x for x in lines if x["logger"] == "prefloop.access"]
    assert access[-1]["status"] == 500 and access[-1]["request_id"] == rid


def test_a_client_request_id_is_kept_on_a_500(env, client, monkeypatch):
    monkeypatch.setattr(user_service, "list_users_with_stats", _boom)
    h = {**env.admin_headers(), "X-Request-ID": "trace-42"}
    r = client.get("/api/v1/users", headers=h)
    assert r.status_code == 500
    assert r.headers["x-request-id"] == "trace-42" and r.json()["request_id"] == "trace-42"


def test_database_outage_is_503_with_retry_after_and_request_id(env, client, monkeypatch):
    def down(*a, **k):
        raise OperationalError("SELECT 1", {}, Exception("connection refused"))

    monkeypatch.setattr(user_service, "list_users_with_stats", down)
    r = client.get("/api/v1/users", headers=env.admin_headers())
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json() == {
        "detail": "database temporarily unavailable",
        "request_id": r.headers["x-request-id"],
    }


def test_4xx_bodies_carry_no_request_id(env, client):
    r = client.get("/api/v1/users")
    assert r.status_code == 401 and r.json() == {"detail": "not authenticated"}
