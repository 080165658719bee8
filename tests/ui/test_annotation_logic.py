"""The UI's client and annotation logic against an in-memory fake of the v1 API.

These pin the UI's side of the contract (status codes, idempotent retries, prefetch); the
browser test (test_browser.py) runs the whole page against the real backend.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from prefloop_client.api import (
    ApiError,
    ApiUnavailable,
    Conflict,
    NoPairReady,
    PrefloopClient,
    Unauthorized,
    normalize_base_url,
)
from ui.annotation import AnnotationDesk
from ui.image_store import ImageStore, NotAnImage, image_extension
from ui.shortcuts import VOTE_ACTIONS, key_map, page_load_js
from ui.tables import escape_markdown, records_table


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def desk(api: Any, tmp_path: Path, clock: Clock) -> AnnotationDesk:
    client = PrefloopClient("http://api.test", transport=api.transport())
    return AnnotationDesk(client, ImageStore(tmp_path / "images"), clock=clock)


def test_fixture_png_is_a_real_image(png_bytes: bytes) -> None:
    assert Image.open(io.BytesIO(png_bytes)).size == (1, 1)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("http://h:8000", "http://h:8000"),
        ("http://h:8000/", "http://h:8000"),
        ("http://h:8000/api/v1/", "http://h:8000"),
        ("https://h/prefix", "https://h/prefix"),
    ],
)
def test_base_url_accepts_root_or_versioned_prefix(given: str, expected: str) -> None:
    assert normalize_base_url(given) == expected


@pytest.mark.parametrize("bad", ["", "ftp://h", "localhost:8000"])
def test_base_url_rejects_non_http(bad: str) -> None:
    with pytest.raises(ValueError):
        normalize_base_url(bad)


def test_error_detail_and_retry_after_are_surfaced() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/votes"):
            return httpx.Response(
                422,
                json={"detail": [{"loc": ["body", "choice"], "msg": "Input should be 'left'"}]},
            )
        return httpx.Response(
            429, json={"detail": "daily cap reached"}, headers={"Retry-After": "90"}
        )

    client = PrefloopClient("http://api.test", transport=httpx.MockTransport(handler))
    with pytest.raises(ApiError) as caught:
        client.vote("t", pair_id=1, choice="left")
    assert caught.value.status_code == 422
    assert caught.value.detail == "choice: Input should be 'left'"
    with pytest.raises(ApiError) as limited:
        client.next_pair("t")
    assert limited.value.status_code == 429 and limited.value.retry_after_s == 90.0


def test_connection_failure_is_api_unavailable() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    client = PrefloopClient("http://api.test", transport=httpx.MockTransport(handler))
    with pytest.raises(ApiUnavailable):
        client.login("a", "b")


def test_204_becomes_no_pair_ready_with_retry_after(api: Any) -> None:
    client = PrefloopClient("http://api.test", transport=api.transport())
    assert client.next_pair("tok-alice") == NoPairReady(3.0)
    api.retry_after = "soon"
    assert client.next_pair("tok-alice") == NoPairReady(2.0)


def test_token_is_not_sent_to_another_origin(png_bytes: bytes) -> None:
    seen: dict[str, str | None] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen[request.url.host] = request.headers.get("Authorization")
        return httpx.Response(200, content=png_bytes, headers={"Content-Type": "image/png"})

    from prefloop_client.api import ImageRef

    client = PrefloopClient("http://api.test", transport=httpx.MockTransport(handler))
    client.image_bytes("secret", ImageRef("1", "/api/v1/images/1"))
    client.image_bytes("secret", ImageRef("2", "http://cdn.test/img/2.png"))
    assert seen == {"api.test": "Bearer secret", "cdn.test": None}


def test_sign_in_detects_roles_and_rejects_bad_passwords(desk: AnnotationDesk) -> None:
    assert desk.sign_in("alice", "pw-alice").is_admin is False
    assert desk.sign_in("root", "pw-root").is_admin is True
    with pytest.raises(Unauthorized):
        desk.sign_in("alice", "wrong")
    with pytest.raises(ValueError):
        desk.sign_in("  ", "x")


def test_vote_flow_uses_the_prefetched_pair_and_counts(
    desk: AnnotationDesk, api: Any, clock: Clock, png_bytes: bytes
) -> None:
    api.add_pair(1, "a *small* red circle")
    api.add_pair(2)
    session = desk.sign_in("alice", "pw-alice")
    first = desk.start(session)
    assert first.kind == "pair" and first.prompt == "a *small* red circle"
    assert Path(first.left_path or "").read_bytes() == png_bytes

    prepared = desk.prefetch(session)
    assert prepared is not None and prepared.pair.pair_id == 2
    requests_before = len(api.requests)

    clock.now += 1.5
    after = desk.vote(session, "left", first.token, client_latency_ms=None)
    assert after is not None and after.kind == "pair" and after.votes_this_session == 1
    # The vote was answered with the prefetched pair: one POST, no new GET /pairs/next.
    assert api.requests[requests_before:] == [("POST", "/api/v1/votes")]
    vote = api.votes[0]
    assert vote["pair_id"] == 1 and vote["choice"] == "left"
    assert vote["client_vote_id"] == first.token and vote["latency_ms"] == 1500

    skipped = desk.vote(session, "skip", after.token, client_latency_ms=420)
    assert skipped is not None and skipped.kind == "waiting" and skipped.retry_in_s == 3
    assert skipped.votes_this_session == 2 and skipped.skips_this_session == 1
    assert skipped.votes_today == 2
    assert api.votes[1]["latency_ms"] == 420


def test_stale_or_repeated_press_is_ignored(desk: AnnotationDesk, api: Any) -> None:
    api.add_pair(1)
    api.add_pair(2)
    session = desk.sign_in("alice", "pw-alice")
    view = desk.start(session)
    assert desk.vote(session, "tie", "not-the-shown-token") is None
    assert desk.vote(session, "tie", view.token) is not None
    # A second key press carrying the old pair's token must not vote on the new pair.
    assert desk.vote(session, "left", view.token) is None
    assert [v["pair_id"] for v in api.votes] == [1]


def test_network_error_keeps_the_pair_and_the_retry_is_idempotent(
    desk: AnnotationDesk, api: Any
) -> None:
    api.add_pair(1)
    session = desk.sign_in("alice", "pw-alice")
    view = desk.start(session)
    api.next_status["/api/v1/votes"] = 503
    failed = desk.vote(session, "right", view.token)
    assert failed is not None and failed.kind == "pair" and failed.token == view.token
    assert failed.level == "error" and "not saved" in failed.notice
    retried = desk.vote(session, "right", view.token)
    assert retried is not None and retried.votes_this_session == 1 and retried.votes_today == 1
    assert len(api.votes) == 1 and api.votes[0]["client_vote_id"] == view.token


def test_a_repeated_vote_is_not_counted_twice_today(desk: AnnotationDesk, api: Any) -> None:
    api.add_pair(1)
    client = PrefloopClient("http://api.test", transport=api.transport())
    first = client.vote("tok-alice", pair_id=1, choice="tie", client_vote_id="abc")
    again = client.vote("tok-alice", pair_id=1, choice="tie", client_vote_id="abc")
    assert (first.duplicate, again.duplicate) == (False, True)
    assert first.vote_id == again.vote_id
    session = desk.sign_in("alice", "pw-alice")
    assert session.votes_today == 1
    view = desk.start(session)
    after = desk.vote(session, "tie", view.token)  # the API answers 200 duplicate
    assert after is not None and after.votes_today == 1 and after.votes_this_session == 1


def test_conflict_moves_on_with_a_warning(desk: AnnotationDesk, api: Any) -> None:
    api.add_pair(1)
    api.add_pair(2)
    client = PrefloopClient("http://api.test", transport=api.transport())
    client.vote("tok-alice", pair_id=1, choice="left", client_vote_id="earlier")
    with pytest.raises(Conflict):
        client.vote("tok-alice", pair_id=1, choice="right")
    session = desk.sign_in("alice", "pw-alice")
    view = desk.start(session)
    after = desk.vote(session, "right", view.token)
    assert after is not None and after.kind == "pair" and after.level == "warning"
    assert "already voted" in after.notice and after.votes_this_session == 0


def test_expired_token_signs_out(desk: AnnotationDesk, api: Any) -> None:
    api.add_pair(1)
    session = desk.sign_in("alice", "pw-alice")
    view = desk.start(session)
    api.expired_tokens.add(session.token)
    after = desk.vote(session, "left", view.token)
    assert after is not None and after.kind == "signed_out" and "expired" in after.notice
    assert session.signed_out


def test_waiting_counts_down_then_retries(desk: AnnotationDesk, api: Any, clock: Clock) -> None:
    session = desk.sign_in("alice", "pw-alice")
    waiting = desk.start(session)
    assert waiting.kind == "waiting" and waiting.retry_in_s == 3
    clock.now += 1.2
    tick = desk.tick(session)
    assert tick is not None and tick.kind == "waiting" and tick.retry_in_s == 2
    api.add_pair(7)
    clock.now += 2.0
    shown = desk.tick(session)
    assert shown is not None and shown.kind == "pair"
    assert desk.tick(session) is None  # not waiting any more


def test_image_store_keeps_bytes_and_reuses_files(tmp_path: Path, png_bytes: bytes) -> None:
    store = ImageStore(tmp_path, max_files=16)
    calls = []

    def fetch() -> tuple[bytes, str]:
        calls.append(1)
        return png_bytes, "image/png"

    first = store.get("42", fetch)
    assert store.get("42", fetch) == first and len(calls) == 1
    assert Path(first).read_bytes() == png_bytes and first.endswith("42.png")
    weird = store.get("../../etc/passwd", fetch)
    assert Path(weird).parent == tmp_path
    for i in range(40):
        store.get(f"img{i}", fetch)
    assert len(list(tmp_path.iterdir())) <= 16
    with pytest.raises(NotAnImage):
        image_extension(b"<html>", "text/html")
    assert image_extension(b"\xff\xd8\xff\xe0", "") == ".jpg"


def test_shortcut_table_is_consistent() -> None:
    keys = key_map()
    assert keys["1"] == keys["ArrowLeft"] == "prefloop-vote-left"
    assert keys[" "] == keys["5"] == "prefloop-vote-skip"
    assert [a.choice for a in VOTE_ACTIONS] == ["left", "right", "tie", "both_bad", "skip"]
    assert all(a.key_hint in a.button_text for a in VOTE_ACTIONS)
    assert json.dumps(keys) in page_load_js()


def test_tables_and_escaping() -> None:
    table = records_table(
        [{"name": "v2", "id": 2, "metrics": {"judge": 0.5}}, {"id": 1, "extra": True}],
        preferred=["id", "name"],
    )
    assert table["headers"] == ["id", "name", "metrics", "extra"]
    assert table["data"] == [[2, "v2", '{"judge":0.5}', ""], [1, "", "", "yes"]]
    assert escape_markdown("a *b* [c](d) <i>") == r"a \*b\* \[c\]\(d\) \<i\>"


def test_table_cells_format_datetimes_and_can_keep_only_known_columns() -> None:
    table = records_table(
        [{"id": 1, "created_at": "2026-11-26T10:48:18.589958", "config": {"steps": 7}}],
        preferred=["id", "created_at"],
        only=True,
    )
    assert table == {"headers": ["id", "created_at"], "data": [[1, "2026-11-26 10:48:18"]]}


def _admin(tmp_path: Path, handler: Any) -> Any:
    from ui.admin import AdminActions

    client = PrefloopClient("http://api.test", transport=httpx.MockTransport(handler))
    return AdminActions(client, tmp_path / "exports", ImageStore(tmp_path / "images"))


DEFAULTS = {"scheme": "dde", "beta": 2000.0, "steps": 200, "drift_budget": 0.15, "seed": 0}


def test_the_round_form_sends_only_what_differs_from_the_defaults() -> None:
    from ui.admin import FormError, form_overrides

    fields = {"scheme": "dde", "beta": 2000.0, "steps": 50.0}
    advanced = [["drift_budget", "null", "about"], ["seed", "", "about"]]
    # steps 50.0 from the number box becomes the integer 50; the empty seed keeps its default
    assert form_overrides(DEFAULTS, fields, advanced) == {"steps": 50, "drift_budget": None}
    assert form_overrides(DEFAULTS, {"beta": None, "scheme": "uniform"}, []) == {
        "scheme": "uniform"
    }
    assert form_overrides(DEFAULTS, {}, [["seed", "7", ""], ["drift_budget", "0.15", ""]]) == {
        "seed": 7
    }
    with pytest.raises(FormError) as exc:
        form_overrides(DEFAULTS, {}, [["sede", "7", ""]])
    assert exc.value.fields == {"sede": "not a round setting"}


def test_the_apis_422_is_split_by_field() -> None:
    from ui.admin import field_errors

    detail = (
        "config.beta: Input should be greater than 0; config.steps: Input should be a valid "
        "integer; something else"
    )
    assert field_errors(detail) == {
        "beta": "Input should be greater than 0",
        "steps": "Input should be a valid integer",
        "": "something else",
    }


def test_start_round_posts_the_overrides_and_maps_a_422_to_the_fields(tmp_path: Path) -> None:
    from ui.admin import FormError, RoundForm

    calls: list[Any] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        calls.append(body)
        if body["config"].get("beta") == -1:
            detail = [{"loc": ["body", "config", "beta"], "msg": "Input should be greater than 0"}]
            return httpx.Response(422, json={"detail": detail})
        return httpx.Response(202, json={"round_id": 5, "status": "queued"})

    actions = _admin(tmp_path, handler)
    form = RoundForm("builtin:shapes", DEFAULTS, {"scheme": ["dde", "uniform"]}, {})
    assert actions.start_round("t", form, {"steps": 7}, []) == "Round 5 queued (steps 7)."
    assert calls == [{"config": {"steps": 7}}]
    with pytest.raises(FormError) as exc:
        actions.start_round("t", form, {"beta": -1}, [])
    assert exc.value.fields == {"beta": "Input should be greater than 0"}
    with pytest.raises(ValueError, match="has not loaded"):
        actions.start_round("t", None, {}, [])
    with pytest.raises(ValueError, match="not a valid round id"):
        actions.cancel_round("t", "../etc")


def test_admin_tables_and_metrics_are_readable_never_json() -> None:
    from ui.admin import VERSION_COLUMNS, ab_markdown, metrics_markdown, table

    version = {
        "id": 3,
        "name": "round-3",
        "status": "candidate",
        "parent_id": 1,
        "created_by_round": 3,
        "metrics": {"heldout_best": {"accuracy": 0.61234, "drift": 0.1}, "judge_delta": 0.05},
        "published_at": None,
    }
    shown = table([version], VERSION_COLUMNS)
    assert shown["headers"][:6] == ["version", "name", "status", "parent", "round", "held-out acc."]
    assert shown["data"] == [[3, "round-3", "candidate", 1, 3, 0.6123, 0.05, ""]]
    text = metrics_markdown({"heldout_best": {"accuracy": 0.5}, "interval": [0.1, 0.2]})
    assert text == "- **heldout best · accuracy:** 0\\.5\n- **interval:** 0\\.1, 0\\.2"
    assert "{" not in text and "[" not in text
    gate = {
        "parent_id": 1,
        "state": "open",
        "battles": 10,
        "wins": 6,
        "losses": 3,
        "ties": 1,
        "win_rate": 0.65,
        "interval": [0.35, 0.86],
        "reason": None,
    }
    assert ab_markdown({"gate": gate, "live": None}) == (
        "- **Blind A/B before serving** (vs version 1): open — 10 votes: 6 wins, 3 losses, "
        "1 ties; win rate 0.65 [0.35, 0.86]"
    )
    assert ab_markdown({"gate": None, "live": None}) == "_No A/B test for this version._"


def test_the_dataset_overview_gives_rates_in_words() -> None:
    from ui.admin import overview_markdown

    stats = {
        "totals": {
            "votes": 200,
            "votes_today": 20,
            "voters": 3,
            "annotators_active_today": 2,
            "votes_by_choice": {"left": 90, "right": 90, "tie": 10, "skip": 10},
            "pairs_active": 18,
            "pairs": {"within_version": 50, "gold": 7},
            "prompts": 12,
            "images": 100,
            "versions": {"published": 1},
            "rounds": {},
        }
    }
    text = overview_markdown(stats)
    assert "- **Votes:** 200 (20 today) from 3 annotators; 2 active today" in text
    assert "ties 5.0%, both bad 0.0%, skips 5.0%" in text  # 10/200, 0/200, 10/200
    assert "**Pairs ready to judge:** 18 (made so far: 50 within version, 7 gold)" in text
    assert "**rounds:** none" in text


def test_admin_curve_includes_the_heldout_series(tmp_path: Path) -> None:
    rows = [
        {"step": 1, "loss": 0.69, "implicit_acc": 0.5, "reward_margin": 0.0, "extra": {}},
        {
            "step": 2,
            "loss": 0.66,
            "implicit_acc": 0.6,
            "reward_margin": 0.1,
            "extra": {
                "heldout": {
                    "step": 2,
                    "accuracy": 0.58,
                    "loss": 0.68,
                    "drift": 0.03,
                    "fidelity": -0.004,
                }
            },
        },
    ]

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"data": rows})

    df = _admin(tmp_path, handler).curve("t", "3")
    got = {(r.series, r.step): r.value for r in df.itertuples()}
    assert got[("heldout_acc", 2)] == 0.58 and got[("drift", 2)] == 0.03
    assert got[("heldout_loss", 2)] == 0.68 and ("heldout_acc", 1) not in got
    assert got[("fidelity_change", 2)] == -0.004
    assert got[("loss", 1)] == 0.69 and len(df) == 3 * 2 + 4


def test_votes_per_hour_become_a_time_series() -> None:
    from ui.admin import votes_per_hour_frame

    stats = {
        "totals": {
            "votes_per_hour": [
                {"hour": "2026-03-01T10:00:00+00:00", "votes": 1},
                {"hour": "2026-03-01T11:00:00+00:00", "votes": 2},
            ]
        }
    }
    frame = votes_per_hour_frame(stats)
    assert [str(h) for h in frame["hour"]] == ["2026-03-01 10:00:00", "2026-03-01 11:00:00"]
    assert frame["votes"].tolist() == [1, 2]
    assert votes_per_hour_frame({"totals": None}).empty


def test_the_credit_plot_and_its_caption(tmp_path: Path) -> None:
    from ui.admin import CREDIT_REFERENCE, CREDIT_SERIES, credit_frame, credit_markdown

    curve = {
        "scheme": "dde",
        "base_model": "builtin:shapes",
        "num_train_timesteps": 4,
        "timesteps": [0, 1, 2, 3],
        "weight": [0.5, 2.5, 0.75, 0.25],
        "density": [0.125, 0.625, 0.1875, 0.0625],
    }
    frame = credit_frame(curve)
    assert frame.columns.tolist() == ["timestep", "credit", "series"]
    assert frame[frame.series == CREDIT_SERIES].credit.tolist() == [0.5, 2.5, 0.75, 0.25]
    assert frame[frame.series == CREDIT_REFERENCE].values.tolist() == [
        [0.0, 1.0, CREDIT_REFERENCE],
        [3.0, 1.0, CREDIT_REFERENCE],
    ]
    text = credit_markdown(curve)
    assert "**dde**" in text and "4 timesteps of builtin:shapes" in text
    assert "up to about 1" in text and "W ≈ 2.5, at about 1" in text
    uniform = {**curve, "scheme": "uniform", "weight": [1.0] * 4}
    # the same two series whatever the scheme (the plot keeps its first colour domain)
    assert set(credit_frame(uniform).series) == {CREDIT_SERIES, CREDIT_REFERENCE}
    assert credit_markdown(uniform).endswith("Every timestep counts the same.")
    assert credit_frame({}).empty

    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        if request.url.params.get("base_model") == "hub/absent":
            return httpx.Response(404, json={"detail": "no scheduler config for 'hub/absent'"})
        return httpx.Response(200, json=curve)

    actions = _admin(tmp_path, handler)
    frame, text = actions.credit("t", "dde", "builtin:shapes")
    assert len(frame) == 6 and "**dde**" in text
    assert seen == ["http://api.test/api/v1/rounds/credit?scheme=dde&base_model=builtin%3Ashapes"]
    frame, text = actions.credit("t", "dde", "hub/absent")
    assert frame.empty and text.startswith("_No credit plot: no scheduler config")
    frame, text = actions.credit("t", None)
    assert frame.empty and "Choose a credit scheme" in text
