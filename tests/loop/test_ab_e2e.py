"""The A/B phase end to end, with the real processes: the API server over HTTP and a Celery
worker on the embedded broker (``bench.loop.LoopStack``), the tiny built-in checkpoint.

round -> candidate -> A/B pairs served (blind) -> votes -> promote -> published -> the pool
serves the new version; then a second round whose candidate loses, is rejected, and is never
served again.

To make the outcome deterministic the voter is scripted: on an A/B pair it picks the image of
the version it is told to favour (it looks the image up in the database; the API shows no
version), elsewhere it picks left. The decisions are the real sequential test's, in the API,
at a large minimum effect (δ = 0.3: 7 straight wins promote, 3 straight losses reject).
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import or_, select
from sqlalchemy.orm import aliased

from backend.models import Image, Pair
from bench.loop import loop_stack, vote_until

pytestmark = pytest.mark.slow

ROUND = {
    "steps": 3,
    "batch_size": 2,
    "learning_rate": 1e-3,
    "lora_rank": 2,
    "checkpoint_every": 2,
    "eval_prompts": 4,
    "holdout_fraction": 0.0,
}
SETTINGS = {
    "pair_pool_target": "8",
    "pair_overlap": "1",
    "gold_fraction": "0",
    "ab_share": "0.5",
    "ab_min_effect": "0.3",
    "ab_budget": "40",
    "publish_policy": "human",
}


class ScriptedVoter:
    """Votes through the public API; on a pair showing ``favour``'s image it picks that one."""

    def __init__(self, stack: Any, name: str) -> None:
        self.stack = stack
        self.api = f"{stack.url}/api/v1"
        self.client = httpx.Client(timeout=30)
        creds = {"username": name, "password": f"{name}-password"}
        assert self.client.post(f"{self.api}/auth/register", json=creds).status_code in (200, 201)
        token = self.client.post(f"{self.api}/auth/token", data=creds).json()["access_token"]
        self.client.headers["Authorization"] = f"Bearer {token}"
        self.favour: int | None = None
        self.seen: list[dict[str, Any]] = []

    def next_pair(self) -> dict[str, Any] | None:
        r = self.client.get(f"{self.api}/pairs/next")
        if r.status_code == 204:
            return None
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"pair_id", "prompt", "left", "right"}  # no version, no kind
        versions = self.stack.image_versions([body["left"]["image_id"], body["right"]["image_id"]])
        body["versions"] = (versions[body["left"]["image_id"]], versions[body["right"]["image_id"]])
        self.seen.append(body)
        return body

    def step(self) -> str | None:
        body = self.next_pair()
        if body is None:
            return None
        left, right = body["versions"]
        choice = "right" if self.favour is not None and right == self.favour != left else "left"
        r = self.client.post(
            f"{self.api}/votes",
            json={
                "pair_id": body["pair_id"],
                "choice": choice,
                "client_vote_id": str(uuid.uuid4()),
            },
        )
        assert r.status_code == 201, r.text
        return choice

    def close(self) -> None:
        self.client.close()


def _round(stack: Any) -> dict[str, Any]:
    round_id = stack.api.client.start_round(stack.api.token, ROUND)
    rnd = stack.follow_round(round_id, timeout=240)
    assert rnd["status"] == "succeeded", (rnd, stack.log_tail("worker"))
    assert rnd["version_id"] is not None, rnd["metrics"]
    return rnd


def _decide(stack: Any, voter: ScriptedVoter, version_id: int) -> dict[str, Any]:
    vote_until(stack, [voter], lambda _n: stack.ab(version_id)["state"] != "open", max_seconds=180)
    return stack.ab(version_id)


def _status(stack: Any, version_id: int) -> str:
    return str(stack.api.client.get_version(stack.api.token, version_id)["status"])


def _active_pairs_with(stack: Any, version_id: int) -> int:
    ia, ib = aliased(Image), aliased(Image)
    with stack.db.read_session() as s:
        return len(
            s.execute(
                select(Pair.id)
                .join(ia, ia.id == Pair.image_a_id)
                .join(ib, ib.id == Pair.image_b_id)
                .where(
                    Pair.active.is_(True),
                    or_(ia.version_id == version_id, ib.version_id == version_id),
                )
            ).all()
        )


def test_candidate_ab_promote_publish_serve_and_a_loser_rejected(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    started = time.monotonic()
    with loop_stack(tmp_path / "data", str(tiny_checkpoint), SETTINGS) as stack:
        voter = ScriptedVoter(stack, "voter-1")
        try:
            assert stack.refill() == 8
            base = stack.api.client.list_versions(stack.api.token)[0]["id"]
            vote_until(stack, [voter], lambda n: n >= 8, max_seconds=120)

            # Round 1 -> a candidate, its A/B gate opened by the human policy.
            rnd = _round(stack)
            cand = rnd["version_id"]
            assert rnd["metrics"]["publish_policy"] == "human"
            assert rnd["metrics"]["policy_action"] == "ab_gate"
            assert _status(stack, cand) == "candidate"
            report = stack.ab(cand)
            assert report["state"] == "open" and report["gate"]["battles"] == 0
            assert report["gate"]["budget"] == 40 and report["gate"]["votes_left"] == 40

            # A/B pairs: candidate against parent, blind, served alongside the usual pairs.
            assert stack.refill() >= 4
            voter.favour = cand
            report = _decide(stack, voter, cand)
            gate = report["gate"]
            assert report["state"] == "promote" and gate["action"] == "published", gate
            assert gate["wins"] >= 7 and gate["losses"] == 0
            ab_seen = [b for b in voter.seen if set(b["versions"]) == {cand, base}]
            assert ab_seen, "no A/B pair was served"
            assert {b["versions"][0] for b in ab_seen} <= {cand, base}
            assert _status(stack, cand) == "published" and _status(stack, base) == "retired"
            assert report["live"]["state"] == "open"  # the live monitor against the parent

            # The pool now serves the new version.
            voter.favour = None
            stack.refill()
            fresh = ScriptedVoter(stack, "voter-2")
            try:
                served = fresh.next_pair()
                while served is not None and set(served["versions"]) != {cand}:
                    served = fresh.next_pair()
                assert served is not None, "no pair of the new version was served"
            finally:
                fresh.close()

            # Round 2 on the new version; its candidate loses and is rejected.
            vote_until(stack, [voter], lambda n: n >= 6, max_seconds=120)
            rnd2 = _round(stack)
            loser = rnd2["version_id"]
            assert rnd2["parent_version_id"] == cand and _status(stack, loser) == "candidate"
            stack.refill()
            voter.favour = cand  # the parent's image, every time
            report = _decide(stack, voter, loser)
            gate = report["gate"]
            assert report["state"] == "reject" and gate["action"] == "retired", gate
            assert gate["losses"] >= 3 and gate["wins"] == 0
            assert _status(stack, loser) == "retired" and _status(stack, cand) == "published"

            # The rejected candidate never serves: none of its pairs are active, none served.
            assert _active_pairs_with(stack, loser) == 0
            stack.refill()
            assert _active_pairs_with(stack, loser) == 0
            late = ScriptedVoter(stack, "voter-3")
            try:
                while (body := late.next_pair()) is not None:
                    assert loser not in body["versions"]
            finally:
                late.close()
            board = httpx.get(  # the whole body: the typed client returns its rows only
                f"{stack.url}/api/v1/leaderboard",
                headers={"Authorization": f"Bearer {stack.api.token}"},
                timeout=30,
            ).json()
            rows = {r["version_id"]: r for r in board["data"]}
            assert rows[loser]["status"] == "retired" and rows[cand]["wins"] >= 7
            assert board["win_rates"]
        finally:
            voter.close()
    assert time.monotonic() - started < 240
