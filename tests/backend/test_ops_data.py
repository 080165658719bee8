"""Health, metrics, stats, annotator reliability, export and import."""

from __future__ import annotations

import io
import json

import pyarrow.parquet as pq

from backend.models import PairKind


def _vote_all(env, headers, choose):
    while True:
        r = env.client.get("/api/v1/pairs/next", headers=headers)
        if r.status_code == 204:
            return
        body = r.json()
        r = env.client.post(
            "/api/v1/votes",
            headers=headers,
            json={"pair_id": body["pair_id"], "choice": choose(body)},
        )
        assert r.status_code == 201


def test_healthz_and_request_id(env, client):
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok", "database": "ok"}
    assert len(r.headers["x-request-id"]) == 32
    r = client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"


def test_unknown_route_is_json_404(env, client):
    r = client.get("/api/v1/nope")
    assert r.status_code == 404 and r.json() == {"detail": "Not Found"}


def test_metrics_count_requests_and_votes(env, client):
    _, h = env.user()
    env.pairs(1)
    p = client.get("/api/v1/pairs/next", headers=h).json()["pair_id"]
    client.post("/api/v1/votes", headers=h, json={"pair_id": p, "choice": "tie"})
    text = client.get("/metrics").text
    assert 'prefloop_votes_total{choice="tie"}' in text
    assert 'route="/api/v1/votes"' in text
    assert "prefloop_http_request_duration_seconds_bucket" in text
    client.get("/api/v1/rounds/5", headers=env.admin_headers())
    assert 'route="/api/v1/rounds/{round_id}"' in client.get("/metrics").text


def test_stats_own_progress_and_admin_totals(env, client):
    _, h = env.user()
    env.pairs(3)
    _vote_all(env, h, lambda body: "left")
    mine = client.get("/api/v1/stats", headers=h).json()
    assert mine == {"me": {"votes": 3, "votes_today": 3}, "totals": None}
    totals = client.get("/api/v1/stats", headers=env.admin_headers()).json()["totals"]
    assert totals["votes"] == 3 and totals["pairs"] == {"within_version": 3}
    assert totals["votes_by_choice"] == {"left": 3}
    assert totals["versions"] == {"published": 1}


def test_users_list_reports_volume_and_gold_reliability(env, client):
    good_id, good = env.user("good")
    bad_id, bad = env.user("bad")
    gold = {p: a for p, a, _ in env.pairs(4, PairKind.gold)}  # gold answer: image a

    def right_answer(body):
        return "left" if body["left"]["image_id"] == gold[body["pair_id"]] else "right"

    def wrong_answer(body):
        return "right" if right_answer(body) == "left" else "left"

    _vote_all(env, good, right_answer)
    _vote_all(env, bad, wrong_answer)
    data = {
        u["username"]: u
        for u in client.get("/api/v1/users", headers=env.admin_headers()).json()["data"]
    }
    assert data["good"]["votes"] == 4 and data["good"]["served"] == 4
    assert data["good"]["gold_seen"] == 4 and data["good"]["gold_accuracy"] == 1.0
    assert data["bad"]["gold_accuracy"] == 0.0
    assert data["admin"]["votes"] == 0 and data["admin"]["gold_accuracy"] is None


def test_export_pickapic_and_jsonl_then_import_round_trip(env, client):
    h = env.admin_headers()
    _, ann = env.user()
    env.pairs(3)
    choices = iter(["left", "right", "tie"])
    _vote_all(env, ann, lambda body: next(choices))
    r = client.get("/api/v1/export?format=jsonl", headers=h)
    assert r.status_code == 200
    rows = [json.loads(line) for line in r.text.splitlines()]
    assert len(rows) == 3
    labels = [(row["label_0"], row["label_1"]) for row in rows]
    assert labels.count((0.5, 0.5)) == 1
    assert all(lab in {(1.0, 0.0), (0.0, 1.0), (0.5, 0.5)} for lab in labels)
    assert all(row["model_0"] == row["model_1"] == "builtin:shapes" for row in rows)

    r = client.get("/api/v1/export?format=pickapic", headers=h)
    assert r.status_code == 200
    table = pq.read_table(io.BytesIO(r.content))
    assert table.num_rows == 3
    for col in (
        "caption",
        "jpg_0",
        "jpg_1",
        "label_0",
        "label_1",
        "model_0",
        "model_1",
        "best_image_uid",
        "has_label",
        "are_different",
        "user_id",
        "ranking_id",
        "created_at",
    ):
        assert col in table.column_names
    assert client.get("/api/v1/export?format=csv", headers=h).status_code == 422

    before = env.counts()
    r = client.post(
        "/api/v1/import",
        headers=h,
        files={"file": ("pap.parquet", r.content, "application/octet-stream")},
    )
    assert r.status_code == 201, r.text
    assert r.json()["pairs"] == 3 and r.json()["votes"] == 3
    after = env.counts()
    assert after["pairs"] == before["pairs"] + 3 and after["votes"] == before["votes"] + 3
    # imported pairs are not served to annotators
    _, other = env.user("other")
    served = {client.get("/api/v1/pairs/next", headers=other).json()["pair_id"] for _ in range(3)}
    assert len(served) == 3
    assert client.get("/api/v1/pairs/next", headers=other).status_code == 204


def test_broken_import_is_422_and_writes_nothing(env, client):
    h = env.admin_headers()
    before = env.counts()
    r = client.post(
        "/api/v1/import",
        headers=h,
        files={"file": ("x.parquet", b"PAR1 this is not parquet", "application/octet-stream")},
    )
    assert r.status_code == 422
    assert env.counts() == before


def test_admin_totals_count_votes_per_clock_hour(env, client):
    from datetime import UTC, datetime

    from sqlalchemy import text

    from backend.services.stats import votes_per_hour

    _, ann = env.user()
    env.pairs(4)
    _vote_all(env, ann, lambda body: "left")
    # 10:59:59, 11:00:00 and 11:30 fall in hours 10 and 11; 07:00 is outside a 3-hour window
    times = [
        "2026-03-01 10:59:59",
        "2026-03-01 11:00:00",
        "2026-03-01 11:30:00",
        "2026-03-01 07:00:00",
    ]
    with env.state.db.transaction() as s:
        ids = [row[0] for row in s.execute(text("SELECT id FROM votes ORDER BY id"))]
        for vote_id, at in zip(ids, times, strict=True):
            s.execute(
                text("UPDATE votes SET created_at = :at WHERE id = :id"),
                {"at": datetime.fromisoformat(at).replace(tzinfo=UTC), "id": vote_id},
            )
    now = datetime(2026, 3, 1, 11, 45, tzinfo=UTC)
    with env.state.db.read_session() as s:
        assert votes_per_hour(s, 3, now=now) == [
            {"hour": "2026-03-01T09:00:00+00:00", "votes": 0},
            {"hour": "2026-03-01T10:00:00+00:00", "votes": 1},
            {"hour": "2026-03-01T11:00:00+00:00", "votes": 2},
        ]
    totals = client.get("/api/v1/stats", headers=env.admin_headers()).json()["totals"]
    assert len(totals["votes_per_hour"]) == 24  # the last 24 hours, up to now
