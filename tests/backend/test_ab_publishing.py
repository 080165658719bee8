"""The A/B gate in the product, through the API on SQLite and PostgreSQL: A/B pairs served and
voted, the first decision recorded (and kept), the publish policy acting on it, the live
monitor's rollback, the admin's publish / reject / rollback, and GET /versions/{id}/ab.

A/B pairs are built here as the pool builds them (a candidate image against its parent's on
one prompt, ``kind = ab``, ``ab_test_id``), with tiny PNGs instead of model samples. Tests open
their A/B tests with a large minimum effect (δ = 0.3) so that a handful of votes decide:
promote after 7 straight wins, reject after 3 straight losses.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from sqlalchemy import select, update

from backend.ab_test import ABSettings
from backend.models import (
    ABPhase,
    ABState,
    ABTest,
    ModelVersion,
    Pair,
    PairKind,
    Prompt,
    UserStatus,
    VersionStatus,
)
from backend.services import ab_tests, publishing
from backend.services import images as image_service
from backend.services import pairs as pair_service
from backend.services import rounds as round_service

FAST = ABSettings(alpha=0.05, min_effect=0.3, budget=20, power=0.9)


def _version(env: Any, name: str, parent_id: int | None, **metrics: Any) -> int:
    with env.state.db.transaction() as s:
        v = ModelVersion(
            name=name,
            base_model="builtin:shapes",
            status=VersionStatus.candidate,
            parent_id=parent_id,
            metrics=dict(metrics),
        )
        s.add(v)
        s.flush()
        return v.id


def _open(env: Any, version_id: int, phase: ABPhase, policy: str = "human") -> int:
    with env.state.db.transaction() as s:
        v = s.get(ModelVersion, version_id)
        return ab_tests.open_test(s, version=v, phase=phase, policy=policy, ab=FAST).id


def _ab_pairs(env: Any, test_id: int, n: int) -> dict[int, int]:
    """``n`` A/B pairs of the test; returns {pair_id: the tested version's image id}."""
    with env.state.db.read_session() as s:
        test = s.get(ABTest, test_id)
        version_id, parent_id = test.version_id, test.parent_id
    out = {}
    with env.state.db.transaction() as s:
        for i in range(n):
            p = Prompt(text=f"a small red circle {uuid.uuid4().hex}", source="test")
            s.add(p)
            s.flush()
            ims = [
                image_service.store_image(
                    s,
                    env.state.store,
                    version_id=vid,
                    prompt_id=p.id,
                    data=env.png(),
                    seed=1000 + i,
                    cfg=7.5,
                    steps=20,
                    sampler="ddim",
                    width=4,
                    height=4,
                )
                for vid in (version_id, parent_id)
            ]
            a, b = (ims[0], ims[1]) if i % 2 else (ims[1], ims[0])
            pair = pair_service.create_pair(
                s, kind=PairKind.ab, image_a_id=a.id, image_b_id=b.id, ab_test_id=test_id
            )
            out[pair.id] = ims[0].id
    return out


def _vote(env: Any, headers: dict[str, str], tested: dict[int, int], prefer: str) -> int:
    """Get a pair, vote for the tested version's image (``prefer="tested"``), the parent's
    (``"parent"``), or ``tie`` / ``both_bad``. Returns the pair id."""
    body = env.client.get("/api/v1/pairs/next", headers=headers).json()
    pid = body["pair_id"]
    mine = tested[pid]
    left_is_tested = body["left"]["image_id"] == mine
    choice = {
        "tested": "left" if left_is_tested else "right",
        "parent": "right" if left_is_tested else "left",
    }.get(prefer, prefer)
    r = env.client.post("/api/v1/votes", headers=headers, json={"pair_id": pid, "choice": choice})
    assert r.status_code == 201, r.text
    return pid


def _ab(env: Any, version_id: int) -> dict[str, Any]:
    r = env.client.get(f"/api/v1/versions/{version_id}/ab", headers=env.admin_headers())
    assert r.status_code == 200, r.text
    return r.json()


def _status(env: Any, version_id: int) -> str:
    with env.state.db.read_session() as s:
        return VersionStatus(s.get(ModelVersion, version_id).status).value


# ---------------------------------------------------------------------------- the gate
def test_a_winning_candidate_is_promoted_published_and_the_decision_sticks(env, client):
    base = env.base_version_id()
    cand = _version(env, "cand", base)
    test_id = _open(env, cand, ABPhase.gate)
    tested = _ab_pairs(env, test_id, 10)
    users = [env.user(f"ann{i}")[1] for i in range(9)]

    report = _ab(env, cand)
    assert report["candidate"] is True and report["state"] == "open"
    gate = report["gate"]
    assert (gate["battles"], gate["votes_left"], gate["budget"]) == (0, 20, 20)
    assert gate["win_rate"] is None and gate["interval"] == [0.0, 1.0]

    # Each annotator takes one A/B pair: an A/B pair is served to one annotator only.
    served = [client.get("/api/v1/pairs/next", headers=h).json()["pair_id"] for h in users[:8]]
    assert len(set(served)) == 8
    # The 8th annotator's pair was served before the decision; it votes after it.
    late_user, late_pair = users[7], served[7]
    for h, pid in zip(users[:7], served[:7], strict=True):
        choice = _side(env, h, pid, tested[pid])
        r = client.post("/api/v1/votes", headers=h, json={"pair_id": pid, "choice": choice})
        assert r.status_code == 201
        if pid != served[6]:
            assert _ab(env, cand)["state"] == "open"

    report = _ab(env, cand)
    gate = report["gate"]
    assert report["state"] == "promote" and gate["action"] == "published", gate
    assert (gate["wins"], gate["losses"], gate["ties"], gate["battles"]) == (7, 0, 0, 7)
    assert gate["votes_left"] == 0 and gate["win_rate"] == 1.0
    assert gate["interval"][0] > 0.5 and gate["decided_at"] is not None
    assert "promote" in gate["reason"]
    assert _status(env, cand) == "published" and _status(env, base) == "retired"
    # The decided gate's pairs are out of the pool; a live test against the parent started.
    with env.state.db.read_session() as s:
        assert not any(s.scalars(select(Pair.active).where(Pair.ab_test_id == test_id)).all())
    assert report["live"]["state"] == "open" and report["live"]["parent_id"] == base

    # A late vote (a losing one) on a pair served before the decision: counted as late, the
    # recorded decision does not move.
    choice = _side(env, late_user, late_pair, tested[late_pair], prefer_tested=False)
    assert (
        client.post(
            "/api/v1/votes", headers=late_user, json={"pair_id": late_pair, "choice": choice}
        ).status_code
        == 201
    )
    gate = _ab(env, cand)["gate"]
    assert gate["state"] == "promote" and gate["battles"] == 7
    assert gate["votes_after_decision"] == 1
    with env.state.db.transaction() as s:
        assert publishing.check_test(s, test_id, env.state.settings) is None


def _side(env: Any, headers: dict[str, str], pid: int, mine: int, prefer_tested=True) -> str:
    """The side of the tested version's image in the order ``headers``' annotator saw."""
    from backend.models import PairAssignment, User

    with env.state.db.read_session() as s:
        rows = s.execute(
            select(PairAssignment.left_image_id, PairAssignment.user_id)
            .join(User, User.id == PairAssignment.user_id)
            .where(PairAssignment.pair_id == pid)
        ).all()
    ((left, _),) = rows
    tested_left = left == mine
    return "left" if tested_left == prefer_tested else "right"


def test_a_losing_candidate_is_rejected_retired_and_never_served(env, client):
    base = env.base_version_id()
    cand = _version(env, "loser", base)
    test_id = _open(env, cand, ABPhase.gate)
    tested = _ab_pairs(env, test_id, 6)
    for i in range(3):
        _, h = env.user(f"ann{i}")
        _vote(env, h, tested, "parent")
    report = _ab(env, cand)
    gate = report["gate"]
    assert report["state"] == "reject" and gate["action"] == "retired", gate
    assert (gate["wins"], gate["losses"]) == (0, 3) and gate["interval"][1] < 0.6
    assert "loses to its parent" in gate["reason"]
    assert _status(env, cand) == "retired" and _status(env, base) == "published"
    assert report["live"] is None
    with env.state.db.read_session() as s:
        metrics = s.get(ModelVersion, cand).metrics
    assert "reject" in metrics["rejected_reason"]
    # Nothing of the candidate is served any more.
    _, fresh = env.user("fresh")
    assert client.get("/api/v1/pairs/next", headers=fresh).status_code == 204


def test_ties_count_half_and_both_bad_is_not_a_vote(env, client):
    base = env.base_version_id()
    cand = _version(env, "tied", base)
    test_id = _open(env, cand, ABPhase.gate)
    tested = _ab_pairs(env, test_id, 4)
    for i, prefer in enumerate(["tie", "both_bad", "tested", "skip"]):
        _, h = env.user(f"ann{i}")
        _vote(env, h, tested, prefer)
    gate = _ab(env, cand)["gate"]
    assert (gate["wins"], gate["losses"], gate["ties"], gate["battles"]) == (1, 0, 1, 2)
    assert gate["win_rate"] == 0.75 and gate["votes_left"] == 18 and gate["state"] == "open"


def test_manual_policy_records_the_decision_and_leaves_the_candidate(env, client):
    base = env.base_version_id()
    cand = _version(env, "manual", base)
    test_id = _open(env, cand, ABPhase.gate, policy="manual")
    tested = _ab_pairs(env, test_id, 8)
    for i in range(7):
        _, h = env.user(f"ann{i}")
        _vote(env, h, tested, "tested")
    gate = _ab(env, cand)["gate"]
    assert gate["state"] == "promote" and gate["action"] == "none"
    assert "an admin decides" in gate["reason"]
    assert _status(env, cand) == "candidate"
    # The admin publishes with the figures in front of them: the gate stays 'promote'.
    r = client.post(f"/api/v1/versions/{cand}/publish", headers=env.admin_headers())
    assert r.status_code == 200 and r.json()["status"] == "published"
    assert _ab(env, cand)["gate"]["state"] == "promote"


def test_promote_does_not_publish_when_the_parent_no_longer_serves(env, client):
    base = env.base_version_id()
    cand = _version(env, "orphan", base)
    other = _version(env, "other", base)
    test_id = _open(env, cand, ABPhase.gate)
    tested = _ab_pairs(env, test_id, 8)
    assert client.post(f"/api/v1/versions/{other}/publish", headers=env.admin_headers()).is_success
    for i in range(7):
        _, h = env.user(f"ann{i}")
        _vote(env, h, tested, "tested")
    gate = _ab(env, cand)["gate"]
    assert gate["state"] == "promote" and gate["action"] == "none"
    assert f"version {other} does" in gate["reason"]
    assert _status(env, cand) == "candidate" and _status(env, other) == "published"


# ---------------------------------------------------------------------------- admin actions
def test_publishing_under_an_open_gate_overrides_it_and_says_so(env, client):
    base = env.base_version_id()
    cand = _version(env, "eager", base)
    test_id = _open(env, cand, ABPhase.gate)
    tested = _ab_pairs(env, test_id, 4)
    _, h = env.user()
    _vote(env, h, tested, "parent")
    r = client.post(f"/api/v1/versions/{cand}/publish", headers=env.admin_headers())
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "published" and "serving version" in body["message"]
    assert any("overridden" in n and "0 wins, 1 losses" in n for n in body["notes"]), body
    assert any("live A/B" in n for n in body["notes"])
    gate = _ab(env, cand)["gate"]
    assert gate["state"] == "overridden" and gate["action"] == "published"
    assert gate["losses"] == 1
    with env.state.db.read_session() as s:
        assert not any(s.scalars(select(Pair.active).where(Pair.ab_test_id == test_id)).all())


def test_reject_closes_the_gate_and_keeps_the_reason(env, client):
    base = env.base_version_id()
    cand = _version(env, "meh", base)
    _open(env, cand, ABPhase.gate)
    h = env.admin_headers()
    r = client.post(f"/api/v1/versions/{cand}/reject", headers=h, json={"reason": "ugly colours"})
    assert r.status_code == 200 and r.json()["status"] == "retired"
    assert r.json()["metrics"]["rejected_reason"] == "ugly colours"
    assert _ab(env, cand)["gate"]["state"] == "overridden"
    # Retire works the same way (without a reason) and is idempotent.
    assert client.post(f"/api/v1/versions/{cand}/retire", headers=h).status_code == 200


def test_rollback_publishes_the_parent_and_bad_requests_are_clear_4xx(env, client):
    h = env.admin_headers()
    base = env.base_version_id()
    # Unknown version: 404 on every version endpoint.
    for method, path in [
        ("GET", "/api/v1/versions/424242/ab"),
        ("POST", "/api/v1/versions/424242/publish"),
        ("POST", "/api/v1/versions/424242/reject"),
        ("POST", "/api/v1/versions/424242/rollback"),
    ]:
        r = client.request(method, path, headers=h)
        assert r.status_code == 404 and "424242" in r.json()["detail"], (path, r.text)
    # The base version has no parent: nothing to roll back to.
    r = client.post(f"/api/v1/versions/{base}/rollback", headers=h)
    assert r.status_code == 409 and "no parent" in r.json()["detail"]
    # A candidate is not serving: rollback is for the serving version.
    cand = _version(env, "c", base)
    r = client.post(f"/api/v1/versions/{cand}/rollback", headers=h)
    assert r.status_code == 409 and "not the serving version" in r.json()["detail"]
    # The serving version cannot be rejected: roll it back instead.
    r = client.post(f"/api/v1/versions/{base}/reject", headers=h)
    assert r.status_code == 409 and "rollback" in r.json()["detail"]
    # A malformed body is a 422, not a 500.
    r = client.post(f"/api/v1/versions/{cand}/reject", headers=h, json={"reason": 5, "x": 1})
    assert r.status_code == 422
    # Publish, then roll back with a reason.
    assert client.post(f"/api/v1/versions/{cand}/publish", headers=h).status_code == 200
    r = client.post(f"/api/v1/versions/{cand}/rollback", headers=h, json={"reason": "too dark"})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "retired" and "parent" in r.json()["message"]
    assert r.json()["metrics"]["rolled_back"] == "rolled back by an admin: too dark"
    assert _status(env, base) == "published"
    live = _ab(env, cand)["live"]
    assert live["state"] == "closed" and live["action"] == "rolled_back"
    assert "too dark" in live["reason"]
    # Annotators cannot reach any of it.
    _, ann = env.user()
    assert client.get(f"/api/v1/versions/{cand}/ab", headers=ann).status_code == 403
    assert client.post(f"/api/v1/versions/{cand}/rollback", headers=ann).status_code == 403


# ---------------------------------------------------------------------------- live monitor
def test_a_significant_live_loss_rolls_back_automatically_with_the_reason(env, client):
    base = env.base_version_id()
    child = _version(env, "child", base)
    r = client.post(f"/api/v1/versions/{child}/publish", headers=env.admin_headers())
    assert r.status_code == 200
    with env.state.db.transaction() as s:
        live = ab_tests.get_test(s, child, ABPhase.live)
        assert live is not None and ABState(live.state) == ABState.open
        s.execute(
            update(ABTest)
            .where(ABTest.id == live.id)
            .values(settings=ab_tests.settings_snapshot(FAST))
        )
        live_id = live.id
    tested = _ab_pairs(env, live_id, 12)
    for i in range(12):
        _, h = env.user(f"ann{i}")
        _vote(env, h, tested, "parent")
        if _status(env, child) != "published":
            break
    report = _ab(env, child)
    live = report["live"]
    assert live["state"] == "rollback" and live["action"] == "rolled_back", live
    assert live["wins"] == 0 and live["losses"] == live["battles"] >= 3
    assert "significantly worse" in live["reason"] and live["log_evalue"] >= live["rollback_at"]
    assert _status(env, child) == "retired" and _status(env, base) == "published"
    with env.state.db.read_session() as s:
        assert "significantly worse" in s.get(ModelVersion, child).metrics["rolled_back"]


def test_live_monitor_under_manual_policy_only_records(env, client):
    base = env.base_version_id()
    child = _version(env, "child", base)
    test_id = _open(env, child, ABPhase.live, policy="manual")
    with env.state.db.transaction() as s:
        from backend.services import versions as version_service

        version_service.publish(s, child)
    tested = _ab_pairs(env, test_id, 8)
    for i in range(8):
        _, h = env.user(f"ann{i}")
        _vote(env, h, tested, "parent")
        if _ab(env, child)["live"]["state"] != "open":
            break  # decided: its pairs are no longer served
    live = _ab(env, child)["live"]
    assert live["state"] == "rollback" and live["action"] == "none"
    assert _status(env, child) == "published"


# ---------------------------------------------------------------------------- the policy
def _settings(env: Any, **kw: Any) -> Any:
    return env.state.settings.model_copy(update=kw)


def test_on_candidate_per_policy(env, client):
    base = env.base_version_id()
    good = _version(env, "good", base, judge_delta=0.05, judge_delta_sem=0.01)
    noisy = _version(env, "noisy", base, judge_delta=0.02, judge_delta_sem=0.02)
    real = _version(env, "real", base)  # no judge metric
    human = _version(env, "human", base, judge_delta=0.05, judge_delta_sem=0.01)
    with env.state.db.transaction() as s:
        metric = _settings(env, publish_policy="metric", metric_margin=0.0)
        out = publishing.on_candidate(s, s.get(ModelVersion, good), metric)
        assert (out.policy, out.action, out.published) == ("metric", "published", True)
        assert "above the margin" in out.reason
        # A positive mean whose interval reaches below the margin is not enough.
        out = publishing.on_candidate(s, s.get(ModelVersion, noisy), metric)
        assert (out.action, out.published) == ("retired", False)
        assert "not above the margin" in out.reason
        # No metric: the gate opens and an admin decides.
        out = publishing.on_candidate(s, s.get(ModelVersion, real), metric)
        assert out.action == "ab_gate" and "no automatic metric" in out.reason
        assert ab_tests.get_test(s, real, ABPhase.gate).policy == "manual"
        # Human: the gate opens whatever the metric says.
        out = publishing.on_candidate(s, s.get(ModelVersion, human), _settings(env))
        assert (out.policy, out.action) == ("human", "ab_gate")
        gate = ab_tests.get_test(s, human, ABPhase.gate)
        assert gate.policy == "human" and gate.settings["budget"] == 400
    assert _status(env, good) == "published" and _status(env, noisy) == "retired"
    assert _status(env, human) == "candidate"
    assert _ab(env, good)["metric"]["passes"] is True
    assert _ab(env, good)["state"] == "none" and _ab(env, good)["live"]["state"] == "open"
    assert _ab(env, real)["metric"] is None


# ---------------------------------------------------------------------------- leaderboard
def test_leaderboard_marks_candidates_and_serves_the_win_rate_matrix(env, client):
    base = env.base_version_id()
    cand = _version(env, "cand", base)
    test_id = _open(env, cand, ABPhase.gate)
    tested = _ab_pairs(env, test_id, 4)
    for i, prefer in enumerate(["tested", "tested", "parent"]):
        _, h = env.user(f"ann{i}")
        _vote(env, h, tested, prefer)
    board = client.get("/api/v1/leaderboard", headers=env.admin_headers()).json()
    rows = {r["version_id"]: r for r in board["data"]}
    assert rows[cand]["candidate"] is True and rows[cand]["status"] == "candidate"
    assert rows[base]["candidate"] is False
    assert (rows[cand]["wins"], rows[cand]["losses"]) == (2, 1)
    matrix = {(w["version_id"], w["opponent_id"]): w for w in board["win_rates"]}
    assert matrix[(cand, base)]["win_rate"] == 2 / 3 and matrix[(cand, base)]["battles"] == 3
    assert matrix[(base, cand)]["win_rate"] == 1 / 3


# ---------------------------------------------------------------------------- training votes
def test_training_votes_exclude_banned_annotators_and_ab_votes(env, client):
    base = env.base_version_id()
    env.pairs(4)
    ok_id, ok = env.user("ok")
    bad_id, bad = env.user("bad")
    for h in (ok, bad):
        for _ in range(2):
            p = client.get("/api/v1/pairs/next", headers=h).json()["pair_id"]
            client.post("/api/v1/votes", headers=h, json={"pair_id": p, "choice": "left"})
    with env.state.db.transaction() as s:  # only the A/B pairs left to serve
        s.execute(update(Pair).where(Pair.kind == PairKind.within_version).values(active=False))
    cand = _version(env, "cand", base)
    tested = _ab_pairs(env, _open(env, cand, ABPhase.gate), 2)
    _vote(env, ok, tested, "tested")
    with env.state.db.transaction() as s:
        from backend.models import User

        s.get(User, bad_id).status = UserStatus.banned
    h = env.admin_headers()
    rid = client.post("/api/v1/rounds", headers=h).json()["round_id"]
    assert client.get(f"/api/v1/rounds/{rid}", headers=h).json()["snapshot_vote_count"] == 2
    with env.state.db.read_session() as s:
        from sqlalchemy import func

        from backend.models import Vote

        q = round_service.training_votes(Vote.id, include_ties=True).order_by(Vote.id)
        assert len(s.execute(q).all()) == 2
        (n,) = s.execute(round_service.training_votes(func.count(), include_ties=True)).one()
        assert n == 2


class _FailingDispatcher:
    def dispatch_round(self, round_id: int) -> str | None:
        raise ConnectionError("broker down")

    def cancel_round(self, round_id: int, task_id: str | None) -> None:
        return None


class _RecordingDispatcher(_FailingDispatcher):
    def dispatch_round(self, round_id: int) -> str | None:
        return f"task-{round_id}"


def test_commit_and_dispatch_records_the_task_or_leaves_the_round_queued(env, client):
    from backend.models import TrainingRound
    from backend.round_config import RoundConfig

    for dispatcher, expected in [(_FailingDispatcher(), None), (_RecordingDispatcher(), "task")]:
        with env.state.db.write_session() as s:
            rnd = round_service.create_round(s, RoundConfig(), created_by=None)
            rid = rnd.id
            got = round_service.commit_and_dispatch(s, dispatcher, rid)
        with env.state.db.read_session() as s:
            row = s.get(TrainingRound, rid)
        assert row.status == "queued"
        if expected is None:
            assert got is None and row.celery_task_id is None
        else:
            assert got == row.celery_task_id == f"task-{rid}"


def test_ab_report_json_is_plain(env, client):
    """The report is JSON-ready (the demo polls it)."""
    base = env.base_version_id()
    cand = _version(env, "cand", base)
    _open(env, cand, ABPhase.gate)
    text = client.get(f"/api/v1/versions/{cand}/ab", headers=env.admin_headers()).text
    body = json.loads(text)
    assert set(body) >= {"version_id", "status", "candidate", "policy", "state", "gate", "live"}
    assert set(body["gate"]) >= {
        "battles",
        "wins",
        "losses",
        "ties",
        "win_rate",
        "interval",
        "state",
        "votes_left",
        "budget",
        "reason",
    }
