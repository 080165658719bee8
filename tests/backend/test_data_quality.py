"""Issue 12 on the API and a real database: shadow-ban, flags, agreement, label rules."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import aliased

from backend.models import Image, Pair, Prompt, Vote
from backend.services import rounds as round_service


def _vote_all(client, headers, n, choice="left", latency_ms=None):
    for _ in range(n):
        r = client.get("/api/v1/pairs/next", headers=headers)
        assert r.status_code == 200, r.text
        body = {"pair_id": r.json()["pair_id"], "choice": choice}
        if latency_ms is not None:
            body["latency_ms"] = latency_ms
        assert client.post("/api/v1/votes", headers=headers, json=body).status_code in (200, 201)


def _snapshot(env, label_rule="each", exclude=frozenset()):
    """The worker's snapshot query (worker.rounds.snapshot_rows without its torch imports)."""
    img_a, img_b = aliased(Image), aliased(Image)
    with env.state.db.read_session() as s:
        rows = s.execute(
            round_service.training_votes(
                Vote.pair_id,
                Vote.user_id,
                Vote.choice,
                Vote.winner_image_id,
                Prompt.text,
                img_a.id,
                img_a.storage_path,
                img_b.id,
                img_b.storage_path,
                include_ties=False,
            )
            .join(Prompt, Prompt.id == Pair.prompt_id)
            .join(img_a, img_a.id == Pair.image_a_id)
            .join(img_b, img_b.id == Pair.image_b_id)
            .order_by(Vote.id)
        ).all()
        users = {r.pair_id: r.user_id for r in rows}
    labels, summary = round_service.label_snapshot(rows, label_rule, exclude_users=exclude)
    return labels, summary, users


def test_shadow_banned_annotator_keeps_voting_and_never_trains(env, client):
    env.pairs(6)
    ok_id, ok = env.user("ok")
    sh_id, sh = env.user("shadow")
    admin = env.admin_headers()
    r = client.patch(f"/api/v1/users/{sh_id}", headers=admin, json={"status": "shadow_banned"})
    assert r.status_code == 200 and r.json()["status"] == "shadow_banned"
    _vote_all(client, ok, 2)
    _vote_all(client, sh, 3)  # still served, still stored
    with env.state.db.read_session() as s:
        assert len(s.scalars(select(Vote.id).where(Vote.user_id == sh_id)).all()) == 3
    rid = client.post("/api/v1/rounds", headers=admin).json()["round_id"]
    assert client.get(f"/api/v1/rounds/{rid}", headers=admin).json()["snapshot_vote_count"] == 2
    for rule in ("each", "majority", "dawid_skene"):
        labels, summary, _ = _snapshot(env, rule)
        assert summary["votes_in"] == 2 and len(labels) == 2
    users = {u["id"]: u for u in client.get("/api/v1/users", headers=admin).json()["data"]}
    assert users[sh_id]["status"] == "shadow_banned" and users[sh_id]["votes"] == 3
    # unban: the votes train again
    client.patch(f"/api/v1/users/{sh_id}", headers=admin, json={"status": "active"})
    assert _snapshot(env)[1]["votes_in"] == 5


def test_status_changes_are_validated(env, client):
    uid, _ = env.user("x")
    admin = env.admin_headers()
    r = client.patch(f"/api/v1/users/{uid}", headers=admin, json={"status": "sleeping"})
    assert r.status_code == 422
    me = client.get("/api/v1/users/me", headers=admin).json()["id"]
    r = client.patch(f"/api/v1/users/{me}", headers=admin, json={"status": "shadow_banned"})
    assert r.status_code == 409
    r = client.patch(f"/api/v1/users/{uid}", headers=admin, json={"status": "banned"})
    assert r.status_code == 200


def test_fast_voter_flagged_and_excluded_from_the_snapshot(env, client):
    env.pairs(12)
    ok_id, ok = env.user("careful")
    fast_id, fast = env.user("fast")
    _vote_all(client, ok, 5, latency_ms=4000)
    _vote_all(client, fast, 6, latency_ms=150)  # < fast_vote_ms (700) every time
    admin = env.admin_headers()
    users = {u["id"]: u for u in client.get("/api/v1/users", headers=admin).json()["data"]}
    assert users[fast_id]["flags"] == ["fast"]
    assert (users[fast_id]["fast_votes"], users[fast_id]["timed_votes"]) == (6, 6)
    assert users[ok_id]["flags"] == [] and users[ok_id]["fast_votes"] == 0
    stats = client.get("/api/v1/stats", headers=admin).json()["totals"]["agreement"]
    assert stats["flagged"] == [fast_id] and stats["votes"] == 11
    labels, summary, _ = _snapshot(env, "each", exclude=frozenset({fast_id}))
    assert (summary["votes_in"], summary["excluded_votes"], summary["excluded_annotators"]) == (
        5,
        6,
        1,
    )
    assert len(labels) == 5


def test_agreement_in_stats_and_users_by_hand(env, client):
    """Two annotators vote "left" on the same two pairs; the sides are served in random order,
    so in pair terms ("a" / "b") they agree or not by chance. The API's alpha must equal
    krippendorff_alpha_nominal (itself tested against hand-computed values) on those codes."""
    from backend.agreement import krippendorff_alpha_nominal

    env.pairs(2)
    u1, h1 = env.user("one")
    u2, h2 = env.user("two")
    _vote_all(client, h1, 2, "left")
    _vote_all(client, h2, 2, "left")
    with env.state.db.read_session() as s:
        rows = s.execute(
            select(Vote.pair_id, Vote.winner_image_id, Pair.image_a_id)
            .join(Pair, Pair.id == Vote.pair_id)
            .order_by(Vote.pair_id)
        ).all()
    by_pair: dict[int, list[str]] = {}
    for p, w, a in rows:
        by_pair.setdefault(p, []).append("a" if w == a else "b")
    expected = krippendorff_alpha_nominal(list(by_pair.values()))
    admin = env.admin_headers()
    got = client.get("/api/v1/stats", headers=admin).json()["totals"]["agreement"]
    assert len(by_pair) == 2 and all(len(v) == 2 for v in by_pair.values())
    assert got["krippendorff_alpha"] == expected
    users = {u["id"]: u for u in client.get("/api/v1/users", headers=admin).json()["data"]}
    # two annotators, every comparison involves both: each one's alpha is the overall alpha
    assert users[u1]["krippendorff_alpha"] == expected == users[u2]["krippendorff_alpha"]
    assert got["cohen_kappa"] == []  # overlap 2 < kappa_min_overlap (20)


# ---------------------------------------------------------------------------- gold pairs
def _files(env) -> int:
    return sum(1 for p in env.state.settings.images_dir.rglob("*") if p.is_file())


def _counts(env) -> tuple[int, int, int]:
    from sqlalchemy import func

    from backend.models import Image
    from backend.models import Prompt as P

    with env.state.db.read_session() as s:
        return tuple(  # type: ignore[return-value]
            s.scalar(select(func.count()).select_from(t)) for t in (Pair, Image, P)
        )


def test_upload_gold_pair_and_bad_uploads_write_nothing(env, client):
    admin = env.admin_headers()
    png = env.png()
    files = {"image_a": ("a.png", png, "image/png"), "image_b": ("b.png", png, "image/png")}
    r = client.post(
        "/api/v1/pairs/gold",
        headers=admin,
        data={"prompt": "  a   blue square ", "answer": "b"},
        files=files,
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert (body["kind"], body["gold_answer"], body["active"]) == ("gold", "b", True)
    with env.state.db.read_session() as s:
        pair = s.get(Pair, body["id"])
        assert s.get(Prompt, pair.prompt_id).text == "a blue square"
    before, files_before = _counts(env), _files(env)
    bad = [
        ({"prompt": "x", "answer": "b"}, {**files, "image_b": ("b.png", b"not an image", "x")}),
        ({"prompt": "x", "answer": "b"}, {**files, "image_b": ("b.png", png[:40], "image/png")}),
        ({"prompt": "x", "answer": "c"}, files),
        ({"prompt": "   ", "answer": "a"}, files),
        ({"prompt": "x\x00y", "answer": "a"}, files),
    ]
    for data, f in bad:
        r = client.post("/api/v1/pairs/gold", headers=admin, data=data, files=f)
        assert r.status_code == 422, (data, r.text)
    assert _counts(env) == before and _files(env) == files_before
    ann = env.user("nogold")[1]
    assert client.post("/api/v1/pairs/gold", headers=ann, data={}, files=files).status_code in (
        401,
        403,
        422,
    )


def test_mark_existing_pair_gold_scores_its_votes(env, client):
    from backend.models import PairKind

    ((pair_id, image_a, _image_b),) = env.pairs(1)
    uid, h = env.user("marked")
    _vote_all(client, h, 1, "left")
    with env.state.db.read_session() as s:
        winner = s.scalar(select(Vote.winner_image_id).where(Vote.user_id == uid))
    voted = "a" if winner == image_a else "b"
    wrong = "b" if voted == "a" else "a"
    admin = env.admin_headers()
    assert _snapshot(env)[1]["votes_in"] == 1
    users = {u["id"]: u for u in client.get("/api/v1/users", headers=admin).json()["data"]}
    assert users[uid]["gold_seen"] == 0  # (and the report is now cached)
    r = client.post(f"/api/v1/pairs/{pair_id}/gold", headers=admin, json={"answer": wrong})
    assert r.status_code == 200 and r.json()["kind"] == "gold"
    assert _snapshot(env)[1]["votes_in"] == 0  # gold pairs never train
    users = {u["id"]: u for u in client.get("/api/v1/users", headers=admin).json()["data"]}
    assert (users[uid]["gold_seen"], users[uid]["gold_correct"]) == (1, 0)
    ((ab_pair, _, _),) = env.pairs(1)
    with env.state.db.transaction() as s:
        s.get(Pair, ab_pair).kind = PairKind.ab  # the check is on the kind alone
    assert (
        client.post(
            f"/api/v1/pairs/{ab_pair}/gold", headers=admin, json={"answer": "a"}
        ).status_code
        == 409
    )
    assert (
        client.post("/api/v1/pairs/999999/gold", headers=admin, json={"answer": "a"}).status_code
        == 404
    )
    r = client.post(f"/api/v1/pairs/{pair_id}/gold", headers=admin, json={"answer": "left"})
    assert r.status_code == 422
    r = client.post(f"/api/v1/pairs/{pair_id}/gold", headers=h, json={"answer": "a"})
    assert r.status_code == 403


# ---------------------------------------------------------------------------- imported data
def _import(env, client, rows) -> None:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({k: [r[k] for r in rows] for k in rows[0]}), buf)
    r = client.post(
        "/api/v1/import",
        headers=env.admin_headers(),
        files={"file": ("pap.parquet", buf.getvalue(), "application/octet-stream")},
    )
    assert r.status_code == 201, r.text


def test_imported_cross_model_pair_reaches_the_snapshot_by_data_source(env, client):
    png = env.png()
    row = {"jpg_0": png, "jpg_1": png, "label_0": 1.0, "label_1": 0.0, "user_id": 7}
    _import(
        env,
        client,
        [
            {**row, "caption": "cross one", "model_0": "sdxl", "model_1": "sd15"},
            {
                **row,
                "caption": "same one",
                "model_0": "sdxl",
                "model_1": "sdxl",
                "label_0": 0.0,
                "label_1": 1.0,
            },
        ],
    )
    env.pairs(1)
    _, h = env.user("collector")
    _vote_all(client, h, 1)

    def snapshot(source):
        with env.state.db.read_session() as s:
            q = round_service.training_votes(
                Prompt.text, Pair.kind, include_ties=False, data_source=source
            ).join(Prompt, Prompt.id == Pair.prompt_id)
            return sorted((text, str(kind)) for text, kind in s.execute(q).all())

    imported = [("cross one", "cross_version"), ("same one", "within_version")]
    assert snapshot("imported") == imported
    collected = snapshot("collected")
    assert len(collected) == 1 and collected[0][1] == "within_version"
    assert snapshot("both") == sorted(imported + collected)
    # the label: image_0 won the cross-model pair, image_1 the other
    labels, summary, _ = _snapshot(env, "majority")
    assert summary["pairs_kept"] == 3
    admin = env.admin_headers()
    for source, n in (("imported", 2), ("collected", 1), ("both", 3)):
        r = client.post("/api/v1/rounds", headers=admin, json={"config": {"data_source": source}})
        assert r.status_code in (200, 201, 202), r.text
        rid = r.json()["round_id"]
        got = client.get(f"/api/v1/rounds/{rid}", headers=admin).json()
        assert got["snapshot_vote_count"] == n
        client.post(f"/api/v1/rounds/{rid}/cancel", headers=admin)
    r = client.post("/api/v1/rounds", headers=admin, json={"config": {"data_source": "web"}})
    assert r.status_code == 422


def test_pickapic_round_trip_is_lossless(env, client):
    """A parquet file written here with pyarrow, imported, exported: user_id, ranking_id,
    created_at, model names and image uids come back as they went in."""
    import io
    from datetime import UTC, datetime

    import pyarrow.parquet as pq

    jpg = io.BytesIO()
    from PIL import Image as PILImage

    PILImage.new("RGB", (8, 8), (200, 10, 10)).save(jpg, format="JPEG")
    when = datetime(2023, 5, 1, 12, 34, 56, 789000, tzinfo=UTC)
    rows = [
        {
            "caption": f"round trip {i}",
            "jpg_0": jpg.getvalue(),
            "jpg_1": jpg.getvalue(),
            "label_0": 1.0 - i,
            "label_1": float(i),
            "model_0": "sdxl-1.0",
            "model_1": "sd-1.5" if i == 0 else "sdxl-1.0",
            "user_id": 424242 + i,
            "ranking_id": 9_000_000_000 + i,
            "created_at": when,
            "image_0_uid": f"3f2a-uid-{i}-0",
            "image_1_uid": f"3f2a-uid-{i}-1",
        }
        for i in (0, 1)
    ]
    _import(env, client, rows)
    r = client.get("/api/v1/export?format=pickapic", headers=env.admin_headers())
    assert r.status_code == 200
    got = {
        row["caption"]: row
        for row in pq.read_table(io.BytesIO(r.content)).to_pylist()
        if row["caption"].startswith("round trip")
    }
    assert len(got) == 2
    keys = ("user_id", "ranking_id", "model_0", "model_1", "image_0_uid", "image_1_uid")
    for row in rows:
        out = got[row["caption"]]
        assert {k: out[k] for k in keys} == {k: row[k] for k in keys}
        assert out["created_at"] == when
        assert (out["label_0"], out["label_1"]) == (row["label_0"], row["label_1"])
        assert out["jpg_0"] == row["jpg_0"]  # JPEG kept byte for byte


def test_malformed_imports_are_422_and_write_nothing(env, client):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    png = env.png()
    good = {"caption": "c", "jpg_0": png, "jpg_1": png, "label_0": 1.0, "label_1": 0.0}
    bad_tables = [
        {k: v for k, v in good.items() if k != "label_1"},  # a missing column
        {**good, "jpg_1": b"\x89PNG\r\n\x1a\n broken"},  # bad image bytes
        {**good, "ranking_id": "seven"},  # a wrong type
        {**good, "image_0_uid": "u" * 200},  # too long to keep
    ]
    before, files = env.counts(), _files(env)
    for cols in bad_tables:
        buf = io.BytesIO()
        # two rows: the bad one second, so a partial write would show
        first = {**cols, "caption": "first"}
        pq.write_table(pa.table({k: [first[k], cols[k]] for k in cols}), buf)
        r = client.post(
            "/api/v1/import",
            headers=env.admin_headers(),
            files={"file": ("x.parquet", buf.getvalue(), "application/octet-stream")},
        )
        assert r.status_code == 422, (list(cols), r.text)
        assert isinstance(r.json()["detail"], str) and r.json()["detail"]
    assert env.counts() == before and _files(env) == files


def _multi_group_parquet(rows, row_group_size) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    table = pa.table({k: [r[k] for r in rows] for k in rows[0]})
    pq.write_table(table, buf, row_group_size=row_group_size)
    assert pq.ParquetFile(io.BytesIO(buf.getvalue())).num_row_groups > 1
    return buf.getvalue()


def _stream_rows(env, n):
    return [
        {
            "caption": f"streamed {i}",
            "jpg_0": env.png(),
            "jpg_1": env.png(),
            "label_0": 1.0,
            "label_1": 0.0,
            "model_0": "sdxl",
            "model_1": "sd15",
            "user_id": 50 + i % 2,
            "has_label": i != 3,  # row 3: no label, read and skipped
        }
        for i in range(n)
    ]


def test_multi_row_group_import_streams_every_row(env, client):
    data = _multi_group_parquet(_stream_rows(env, 11), row_group_size=3)  # 3+3+3+2 rows
    before, files = env.counts(), _files(env)
    r = client.post(
        "/api/v1/import",
        headers=env.admin_headers(),
        files={"file": ("big.parquet", data, "application/octet-stream")},
    )
    assert r.status_code == 201, r.text
    assert r.json() == {
        "pairs": 10,
        "votes": 10,
        "prompts_created": 10,
        "annotators_created": 2,
        "versions_created": 2,
        "rows": 11,
        "rows_unlabelled": 1,
        "row_groups": 4,
    }
    after = env.counts()
    assert after["pairs"] - before["pairs"] == 10 and after["votes"] - before["votes"] == 10
    assert after["images"] - before["images"] == 20 and _files(env) - files == 20


def test_bad_row_in_the_last_row_group_writes_nothing(env, client):
    bad_rows = []
    for field, value in (("jpg_1", b"\x89PNG\r\n\x1a\n broken"), ("label_0", 0.3)):
        rows = _stream_rows(env, 10)
        rows[-1][field] = value  # row 9: alone in the last row group
        bad_rows.append((field, _multi_group_parquet(rows, row_group_size=3)))
    before, files = env.counts(), _files(env)
    for field, data in bad_rows:
        r = client.post(
            "/api/v1/import",
            headers=env.admin_headers(),
            files={"file": ("x.parquet", data, "application/octet-stream")},
        )
        assert r.status_code == 422, r.text
        assert r.json()["detail"].startswith("invalid Pick-a-Pic parquet: row 9:"), r.text
        assert field in r.json()["detail"]
    # rows 0-8 were written (and their 18 images stored) before row 9 failed: all rolled back
    assert env.counts() == before and _files(env) == files


def test_quality_report_is_cached_while_votes_stream_in_and_not_across_status_changes(env, client):
    from backend.services.quality import quality_report

    env.pairs(4)
    uid, h = env.user("streamer")
    _vote_all(client, h, 1, latency_ms=100)
    slow = env.state.settings.model_copy(update={"quality_max_age_seconds": 3600.0})
    with env.state.db.read_session() as s:
        first = quality_report(s, slow)
    assert first.annotators[uid].timed_votes == 1
    _vote_all(client, h, 1, latency_ms=100)
    with env.state.db.read_session() as s:
        assert quality_report(s, slow) is first  # a new vote: the cached report, for an hour
        assert quality_report(s, env.state.settings).annotators[uid].timed_votes == 2  # max age 0
    with env.state.db.read_session() as s:
        cached = quality_report(s, slow)  # the fresh one is cached now
    client.patch(
        f"/api/v1/users/{uid}", headers=env.admin_headers(), json={"status": "shadow_banned"}
    )
    with env.state.db.read_session() as s:
        assert quality_report(s, slow) is not cached  # a status change recomputes at once
