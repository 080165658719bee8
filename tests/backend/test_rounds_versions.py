"""Training rounds (queue, dispatch after commit, cancel) and versions (publish/retire)."""

from __future__ import annotations

from backend.models import PairKind, VersionStatus
from backend.round_config import FAMILY_DEFAULTS, RoundConfig


def test_create_round_is_202_committed_then_dispatched(env, client):
    _, ann = env.user()
    env.pairs(2)
    for _ in range(2):
        p = client.get("/api/v1/pairs/next", headers=ann).json()["pair_id"]
        client.post("/api/v1/votes", headers=ann, json={"pair_id": p, "choice": "left"})
    h = env.admin_headers()
    r = client.post("/api/v1/rounds", headers=h, json={"config": {"steps": 10, "beta": 500}})
    assert r.status_code == 202, r.text
    rid = r.json()["round_id"]
    assert r.json()["status"] == "queued"
    assert env.dispatcher.dispatched == [rid]
    assert env.dispatcher.committed_at_dispatch == [True]
    one = client.get(f"/api/v1/rounds/{rid}", headers=h).json()
    assert one["status"] == "queued" and one["progress"] == 0 and one["step"] == 0
    assert one["version_id"] is None and one["metrics"] == {}
    assert one["config"]["steps"] == 10 and one["config"]["scheme"] == "dde"
    assert one["total_steps"] == 10
    assert one["snapshot_vote_count"] == 2 and one["snapshot_max_vote_id"] >= 2
    assert one["parent_version_id"] == env.base_version_id()
    listing = client.get("/api/v1/rounds", headers=h).json()
    assert listing["count"] == 1 and listing["data"][0]["id"] == rid


def test_round_without_body_uses_defaults(env, client):
    r = client.post("/api/v1/rounds", headers=env.admin_headers())
    assert r.status_code == 202


def test_bad_round_config_is_422_naming_the_field_and_writes_nothing(env, client):
    h = env.admin_headers()
    for config, field in [
        ({"beta": -1}, "beta"),
        ({"scheme": "magic"}, "scheme"),
        ({"learning_rate": "fast"}, "learning_rate"),
        ({"steps": 0}, "steps"),
        ({"unknown_knob": 1}, "unknown_knob"),
        ({"label_noise": "flip"}, "label_noise"),  # removed: named, with why
        ({"label_smoothing": 0.1}, "label_smoothing"),
        ({"eval_timesteps": 0}, "eval_timesteps"),
        ({"holdout_fraction": 0.9}, "holdout_fraction"),
    ]:
        r = client.post("/api/v1/rounds", headers=h, json={"config": config})
        assert r.status_code == 422, config
        assert any(field in e["loc"] for e in r.json()["detail"]), r.json()
    r = client.post("/api/v1/rounds", headers=h, json={"parent_version_id": 9999})
    assert r.status_code == 404
    assert env.count("training_rounds") == 0
    assert env.dispatcher.dispatched == []


def test_config_schema_is_served(env, client):
    schema = client.get("/api/v1/rounds/config-schema", headers=env.admin_headers()).json()
    assert set(schema["properties"]["scheme"]["enum"]) == {
        "dde",
        "uniform",
        "dde-stepwise",
        "dde-single-shot",
    }


def test_round_defaults_follow_the_base_model_family(env, client):
    h = env.admin_headers()
    d = client.get("/api/v1/rounds/config-defaults", headers=h)
    assert d.status_code == 200, d.text
    d = d.json()
    assert d["base_model"] == "builtin:shapes"
    assert d["config"]["learning_rate"] == FAMILY_DEFAULTS["builtin"]["learning_rate"]
    assert d["config"]["learning_rate"] != RoundConfig().learning_rate
    rid = client.post("/api/v1/rounds", headers=h, json={"config": {"steps": 5}}).json()["round_id"]
    assert client.get(f"/api/v1/rounds/{rid}", headers=h).json()["config"] == {
        **d["config"],
        "steps": 5,
    }
    client.post(f"/api/v1/rounds/{rid}/cancel", headers=h)
    r = client.post("/api/v1/rounds", headers=h, json={"config": {"learning_rate": 0.5}})
    got = client.get(f"/api/v1/rounds/{r.json()['round_id']}", headers=h).json()["config"]
    assert got["learning_rate"] == 0.5 and got["lora_rank"] == d["config"]["lora_rank"]
    base = env.base_version_id()
    by_parent = client.get(
        f"/api/v1/rounds/config-defaults?parent_version_id={base}", headers=h
    ).json()
    assert by_parent == d
    bad = client.get("/api/v1/rounds/config-defaults?parent_version_id=9999", headers=h)
    assert bad.status_code == 404
    # beyond the id column's range: a 422, never a database error (found by the fuzz test)
    huge = client.get(f"/api/v1/rounds/config-defaults?parent_version_id={2**31}", headers=h)
    assert huge.status_code == 422
    _, ann = env.user()
    assert client.get("/api/v1/rounds/config-defaults", headers=ann).status_code == 403


def test_cancel_then_409_and_unknown_round_404(env, client):
    h = env.admin_headers()
    rid = client.post("/api/v1/rounds", headers=h).json()["round_id"]
    r = client.post(f"/api/v1/rounds/{rid}/cancel", headers=h)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert env.dispatcher.cancelled == [rid]
    assert client.post(f"/api/v1/rounds/{rid}/cancel", headers=h).status_code == 409
    assert client.get("/api/v1/rounds/424242", headers=h).status_code == 404
    assert client.post("/api/v1/rounds/424242/cancel", headers=h).status_code == 404
    assert client.get(f"/api/v1/rounds/{rid}/metrics", headers=h).json() == {"data": []}


def test_base_version_exists_and_is_published(env, client):
    data = client.get("/api/v1/versions", headers=env.admin_headers()).json()["data"]
    assert [(v["name"], v["status"], v["parent_id"]) for v in data] == [
        ("builtin:shapes", "published", None)
    ]


def test_publish_swaps_the_serving_version_and_rollback_is_publishing_the_parent(env, client):
    h = env.admin_headers()
    base = env.base_version_id()
    child = env.version("round-1", parent_id=base)
    r = client.post(f"/api/v1/versions/{child}/publish", headers=h)
    assert r.status_code == 200 and r.json()["status"] == "published"
    statuses = {
        v["id"]: v["status"] for v in client.get("/api/v1/versions", headers=h).json()["data"]
    }
    assert statuses == {base: "retired", child: "published"}
    # publishing again is idempotent
    assert client.post(f"/api/v1/versions/{child}/publish", headers=h).status_code == 200
    # the serving version cannot be retired directly
    assert client.post(f"/api/v1/versions/{child}/retire", headers=h).status_code == 409
    # rollback
    assert client.post(f"/api/v1/versions/{base}/publish", headers=h).status_code == 200
    statuses = {
        v["id"]: v["status"] for v in client.get("/api/v1/versions", headers=h).json()["data"]
    }
    assert statuses == {base: "published", child: "retired"}
    assert client.post("/api/v1/versions/777/publish", headers=h).status_code == 404
    published = client.get("/api/v1/versions?status=published", headers=h).json()
    assert published["count"] == 1


def test_retire_a_candidate(env, client):
    h = env.admin_headers()
    cand = env.version("cand", VersionStatus.candidate)
    r = client.post(f"/api/v1/versions/{cand}/retire", headers=h)
    assert r.status_code == 200 and r.json()["status"] == "retired"


def test_leaderboard_from_cross_version_votes(env, client):
    h = env.admin_headers()
    assert client.get("/api/v1/leaderboard", headers=h).json() == {"data": [], "win_rates": []}
    challenger = env.version("challenger")
    pairs = {p: (a, b) for p, a, b in env.pairs(6, PairKind.cross_version, version_b=challenger)}
    _, ann = env.user()
    for _ in range(6):
        body = client.get("/api/v1/pairs/next", headers=ann).json()
        a, b = pairs[body["pair_id"]]
        side = "left" if body["left"]["image_id"] == b else "right"  # challenger always wins
        assert (
            client.post(
                "/api/v1/votes", headers=ann, json={"pair_id": body["pair_id"], "choice": side}
            ).status_code
            == 201
        )
    board = client.get("/api/v1/leaderboard", headers=h).json()["data"]
    by_id = {row["version_id"]: row for row in board}
    assert by_id[challenger]["wins"] == 6 and by_id[challenger]["battles"] == 6
    assert by_id[env.base_version_id()]["losses"] == 6
    assert by_id[challenger]["score"] > by_id[env.base_version_id()]["score"]
    assert by_id[challenger]["ci_low"] <= by_id[challenger]["score"] <= by_id[challenger]["ci_high"]
