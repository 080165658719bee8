"""The annotator page and the admin dashboard in a real headless Chromium, against the real
backend.

One real uvicorn server (in a thread) serves ``backend.main.create_app()`` on a temporary
SQLite data dir, with the Gradio UI mounted at ``/`` exactly as ``prefloop serve`` mounts it.
The fixture seeds a prompt, two PNG images of the base version and a pair, a candidate version
with a validation grid, and two annotators. The tests: an annotator votes with the keyboard;
an admin starts a round from the form (and sees a bad value named beside its field, and the
chosen credit scheme's plot over timesteps beside the form, following the scheme), watches
its progress and curve move, publishes the candidate from its gallery, bans an annotator (whose
next request is refused) and uploads prompts; both pages at 1280x800 and 390x844. Any
JavaScript error or console error fails the test; screenshots are kept in the test's tmp dir
and in ``var/screenshots/``.

Needs Chromium at /usr/bin/chromium (Debian: ``apt-get install -y --no-install-recommends
chromium chromium-driver``); playwright drives it, it never downloads a browser.
"""

from __future__ import annotations

import io
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from PIL import Image, ImageDraw

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ADMIN_PASSWORD = "ui-admin-password-1"
ANNOTATOR = ("ann_ui", "annotator-pw-1")
TO_BAN = ("ann_to_ban", "annotator-pw-2")
CANDIDATE = "round-ui-candidate"
PROMPT = "a small red circle on a blue background, top left"
REPO_ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO_ROOT / "var" / "screenshots"
VIEWPORTS = {"desktop": (1280, 800), "phone": (390, 844)}

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    # Outside CI a machine without Chromium skips; in CI (`make test` installs it) it fails.
    pytest.mark.skipif(
        not os.path.exists(CHROMIUM) and not os.environ.get("CI"),
        reason=f"needs Chromium at {CHROMIUM} (scripts/system_deps.sh installs it)",
    ),
]


def _shape_png(circle_xy: tuple[int, int], radius: int) -> bytes:
    image = Image.new("RGB", (64, 64), (30, 60, 200))
    x, y = circle_xy
    ImageDraw.Draw(image).ellipse(
        (x - radius, y - radius, x + radius, y + radius), fill=(220, 30, 30)
    )
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class LiveServer:
    url: str
    settings: object
    candidate_id: int = 0

    def token(self, username: str, password: str) -> str:
        response = httpx.post(
            f"{self.url}/api/v1/auth/token", data={"username": username, "password": password}
        )
        response.raise_for_status()
        return str(response.json()["access_token"])


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    import gradio as gr
    import uvicorn

    from backend.db import Database
    from backend.dispatch import NullDispatcher
    from backend.main import create_app
    from backend.migrate import upgrade
    from backend.models import ModelVersion, PairKind, VersionStatus
    from backend.services import images as image_service
    from backend.services import pairs as pair_service
    from backend.services import prompts as prompt_service
    from backend.services import versions as version_service
    from backend.settings import Settings
    from backend.storage import ImageStore
    from ui.app import build_ui

    data_dir = tmp_path_factory.mktemp("prefloop-data")
    env = pytest.MonkeyPatch()
    env.setenv("PREFLOOP_DATA_DIR", str(data_dir))
    env.setenv("PREFLOOP_ADMIN_PASSWORD", ADMIN_PASSWORD)
    env.setenv("GRADIO_TEMP_DIR", str(data_dir / "gradio"))
    env.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    settings = Settings(
        argon2_time_cost=1,
        argon2_memory_kib=8192,
        log_json=False,
        log_level="WARNING",
        login_rate_limit_attempts=1000,  # the tests sign in many times a minute
    )
    assert settings.data_dir == data_dir and settings.is_local
    upgrade(settings.db_url)

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    app = create_app(settings=settings, dispatcher=NullDispatcher())
    app = gr.mount_gradio_app(app, build_ui(url), path="/")
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)

    # Seed after start-up, which created the admin account and the base (published) version.
    db = Database(settings.db_url, pool_size=2, max_overflow=0)
    with db.transaction() as session:
        version = version_service.ensure_base_version(session, settings.base_model)
        prompt_service.add_prompts(session, [prompt_service.PromptIn(PROMPT, "ui-test")])
        prompt_id = prompt_service.list_prompts(session, offset=0, limit=10, active=None)[0][0].id
        images = [
            image_service.store_image(
                session,
                ImageStore(settings.images_dir),
                version_id=version.id,
                prompt_id=prompt_id,
                data=_shape_png(xy, r),
                seed=seed,
                cfg=3.0,
                steps=20,
                sampler="ddim",
                width=64,
                height=64,
            )
            for seed, (xy, r) in enumerate((((16, 16), 10), ((44, 40), 14)))
        ]
        pair_service.create_pair(
            session,
            kind=PairKind.within_version,
            image_a_id=images[0].id,
            image_b_id=images[1].id,
        )
        # A candidate with its validation grid, where a round writes them (docs/publishing.md).
        adapter = f"versions/{CANDIDATE}/adapter.safetensors"
        candidate = ModelVersion(
            name=CANDIDATE,
            base_model=settings.base_model,
            status=VersionStatus.candidate,
            parent_id=version.id,
            adapter_path=adapter,
            metrics={"heldout_best": {"accuracy": 0.625, "drift": 0.05}, "judge_delta": 0.04},
        )
        session.add(candidate)
        session.flush()
        candidate_id = candidate.id
    db.dispose()
    samples = settings.models_dir / "versions" / CANDIDATE / "samples"
    samples.mkdir(parents=True)
    (samples.parent / "adapter.safetensors").write_bytes(b"adapter")
    for name, xy in (("parent-00.png", (16, 16)), ("candidate-00.png", (40, 40))):
        (samples / name).write_bytes(_shape_png(xy, 12))
    manifest = {
        "files": [
            {
                "prompt": PROMPT,
                "seed": 7,
                "parent": "parent-00.png",
                "candidate": "candidate-00.png",
            }
        ]
    }
    (samples / "samples.json").write_text(json.dumps(manifest))

    live = LiveServer(url=url, settings=settings, candidate_id=candidate_id)
    admin_token = live.token(settings.admin_username, ADMIN_PASSWORD)
    for username, password in (ANNOTATOR, TO_BAN):
        created = httpx.post(
            f"{url}/api/v1/users",
            json={"username": username, "password": password},
            headers={"Authorization": f"Bearer {admin_token}"},
        )
        assert created.status_code == 201, created.text
    try:
        yield live
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        env.undo()


@pytest.fixture
def page(tmp_path: Path) -> Iterator[object]:
    """A page of a fresh headless Chromium at 1280x800; the test fails on any JavaScript
    error or console error the page logs."""
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            user_data_dir=str(tmp_path / "chromium-profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 800},
        )
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
            page.on(
                "console",
                lambda msg: (
                    errors.append(f"console {msg.type}: {msg.text}")
                    if msg.type == "error"
                    else None
                ),
            )
            page.set_default_timeout(30000)  # a busy 2-core machine
            yield page
        finally:
            context.close()
    assert errors == [], "JavaScript errors on the page"


def _screenshot(page, tmp_path: Path, name: str) -> Path:  # type: ignore[no-untyped-def]
    """Save the page in the test's tmp dir and in var/screenshots/ (test artifacts)."""
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    (SCREENSHOTS / path.name).write_bytes(path.read_bytes())
    return path


def _sign_in(page, url: str, username: str, password: str) -> None:  # type: ignore[no-untyped-def]
    page.goto(url + "/")
    page.locator("#prefloop-username input").fill(username)
    page.locator("#prefloop-password input").fill(password)
    page.locator("#prefloop-sign-in").click()


IMAGE_LOADED = """(selector) => {
  const img = document.querySelector(selector);
  return !!img && img.complete && img.naturalWidth > 0;
}"""


def test_annotator_votes_with_the_keyboard(live_server: LiveServer, page, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _sign_in(page, live_server.url, *ANNOTATOR)

    page.wait_for_function(IMAGE_LOADED, arg="#prefloop-left img")
    page.wait_for_function(IMAGE_LOADED, arg="#prefloop-right img")
    sizes = page.evaluate(
        "() => ['#prefloop-left img', '#prefloop-right img'].map("
        "s => [document.querySelector(s).naturalWidth, document.querySelector(s).naturalHeight])"
    )
    assert sizes == [[64, 64], [64, 64]]
    assert PROMPT in page.locator("#prefloop-prompt").inner_text()
    assert "0 votes this session" in page.locator("#prefloop-progress").inner_text()
    assert "0 today" in page.locator("#prefloop-progress").inner_text()
    # The shortcuts are written on the buttons; the admin tab is not offered to annotators.
    assert "[1]" in page.locator("#prefloop-vote-left").inner_text()
    assert "[5 / Space]" in page.locator("#prefloop-vote-skip").inner_text()
    assert page.get_by_role("tab", name="Admin").count() == 0
    assert "Guidelines" in page.locator("#prefloop-guidelines").inner_text()

    page.screenshot(path=str(tmp_path / "ui-pair.png"), full_page=True)
    shared = REPO_ROOT / "var" / "ui-screenshot.png"
    shared.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shared), full_page=True)
    assert (tmp_path / "ui-pair.png").stat().st_size > 10_000

    page.wait_for_timeout(300)  # a measurable display-to-click latency
    page.keyboard.press("1")

    # One pair only: after the vote the page counts it and waits for the next pair.
    page.wait_for_function(
        "() => document.querySelector('#prefloop-progress').innerText.includes('1 vote this session')"
    )
    page.wait_for_function(
        "() => document.querySelector('#prefloop-notice').innerText.includes('No pair ready')"
    )
    assert "1 today" in page.locator("#prefloop-progress").inner_text()
    assert page.locator("#prefloop-vote-left").is_disabled()

    admin = live_server.token(live_server.settings.admin_username, ADMIN_PASSWORD)  # type: ignore[attr-defined]
    stats = httpx.get(
        f"{live_server.url}/api/v1/stats", headers={"Authorization": f"Bearer {admin}"}
    ).json()
    assert stats["totals"]["votes"] == 1
    assert stats["totals"]["votes_by_choice"] == {"left": 1}

    from sqlalchemy import create_engine, text

    engine = create_engine(live_server.settings.db_url)  # type: ignore[attr-defined]
    with engine.connect() as conn:
        row = conn.execute(
            text(
                "SELECT v.choice, v.client_vote_id, v.latency_ms, u.username FROM votes v "
                "JOIN users u ON u.id = v.user_id"
            )
        ).one()
    engine.dispose()
    choice, client_vote_id, latency_ms, username = row
    assert (choice, username) == ("left", ANNOTATOR[0])
    assert client_vote_id and len(client_vote_id) == 32
    assert latency_ms is not None and 250 <= latency_ms < 15000


def _text_includes(page, selector: str, text: str, timeout: float = 30000) -> None:  # type: ignore[no-untyped-def]
    page.wait_for_function(
        "([s, t]) => { const e = document.querySelector(s); return !!e && e.innerText.includes(t); }",
        arg=[selector, text],
        timeout=timeout,
    )


def _open_admin(page, live_server: LiveServer) -> None:  # type: ignore[no-untyped-def]
    _sign_in(page, live_server.url, live_server.settings.admin_username, ADMIN_PASSWORD)  # type: ignore[attr-defined]
    _text_includes(page, "#prefloop-progress", "Signed in as")
    page.get_by_role("tab", name="Admin").click()
    _text_includes(page, "#prefloop-admin-stats", "Pairs ready to judge")
    _text_includes(page, "#prefloop-round-form-info", "Defaults for")


def _choose(page, dropdown: str, option: str) -> None:  # type: ignore[no-untyped-def]
    page.locator(f"{dropdown} input").click()
    page.get_by_role("option", name=option).first.click()


def _api(live_server: LiveServer, method: str, path: str, **kw: object) -> httpx.Response:
    settings = live_server.settings
    token = live_server.token(settings.admin_username, ADMIN_PASSWORD)  # type: ignore[attr-defined]
    return httpx.request(
        method,
        f"{live_server.url}/api/v1{path}",
        headers={"Authorization": f"Bearer {token}"},
        **kw,  # type: ignore[arg-type]
    )


#: What the credit plot draws: its canvas's pixels, or its SVG (vega-embed renders either).
_CREDIT_PLOT = """() => {
    const el = document.querySelector('#prefloop-credit-plot');
    const canvas = el && el.querySelector('canvas');
    if (canvas && canvas.width > 0) return canvas.toDataURL();
    const svg = el && el.querySelector('svg');
    return svg ? svg.outerHTML : '';
}"""
#: The credit plot's drawn lines (vega's SVG): ``[stroke colour, number of path commands]``.
_CREDIT_LINES = """() => Array.from(
    document.querySelectorAll('#prefloop-credit-plot svg .mark-line path')
).map(p => [p.getAttribute('stroke'), ((p.getAttribute('d') || '').match(/[ML]/g) || []).length])"""


def _coloured_lines(page) -> list[int]:  # type: ignore[no-untyped-def]
    """The number of points of each line of the credit plot that has a colour, sorted."""
    return sorted(n for stroke, n in page.evaluate(_CREDIT_LINES) if stroke)


def _settled_credit_plot(page) -> str:  # type: ignore[no-untyped-def]
    """The credit plot once it has stopped changing (vega animates its updates)."""
    last = None
    for _ in range(60):
        now = page.evaluate(_CREDIT_PLOT)
        if now and now == last:
            return str(now)
        last = now
        page.wait_for_timeout(250)
    raise AssertionError("the credit plot never settled")


def test_admin_starts_a_round_from_the_form_and_watches_it_move(
    live_server: LiveServer, page, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    _open_admin(page, live_server)
    # The form holds the built-in family's defaults; nothing on the tab is raw JSON.
    assert page.locator("#prefloop-field-steps input").input_value() == "200"
    assert page.locator("#prefloop-field-scheme input").input_value() == "dde"
    # Beside the form: the default scheme's credit over the built-in model's 1000 timesteps.
    _text_includes(page, "#prefloop-credit-info", "Credit W of dde over the 1000 timesteps")
    page.wait_for_function(f"() => ({_CREDIT_PLOT})().length > 0")
    plot, fields = (
        page.locator(s).bounding_box() for s in ("#prefloop-credit-plot", "#prefloop-round-fields")
    )
    assert plot and fields and plot["width"] > 200 and plot["height"] > 100
    assert plot["x"] >= fields["x"] + fields["width"] - 1, (plot, fields)  # to its right
    assert plot["y"] < fields["y"] + fields["height"] and fields["y"] < plot["y"] + plot["height"]
    admin_text = page.locator("#prefloop-app").inner_text()
    assert '{"' not in admin_text and '":' not in admin_text
    dde_plot = _settled_credit_plot(page)
    # both lines are drawn, in colour: the scheme's through every point, the uniform reference
    assert _coloured_lines(page) == [2, 100]
    _screenshot(page, tmp_path, "admin-credit-dde")

    page.locator("#prefloop-field-beta input").fill("-1")
    page.locator("#prefloop-start-round").click()
    _text_includes(page, "#prefloop-round-errors", "β (KL strength)")
    assert "greater than 0" in page.locator("#prefloop-field-beta").inner_text()  # beside it
    assert _api(live_server, "GET", "/rounds").json()["count"] == 0

    page.locator("#prefloop-field-beta input").fill("2000")
    page.locator("#prefloop-field-steps input").fill("7")
    _choose(page, "#prefloop-field-scheme", "uniform")
    # The plot follows the scheme: uniform credit is flat.
    _text_includes(page, "#prefloop-credit-info", "Every timestep counts the same")
    assert _settled_credit_plot(page) != dde_plot
    assert _coloured_lines(page) == [2, 100]  # a line Gradio leaves uncoloured is not drawn
    _screenshot(page, tmp_path, "admin-credit-uniform")
    page.locator("#prefloop-start-round").click()
    _text_includes(page, "#prefloop-admin-status", "queued")
    assert page.locator("#prefloop-round-errors").inner_text().strip() == ""
    rounds = _api(live_server, "GET", "/rounds").json()["data"]
    assert [(r["status"], r["config"]["steps"], r["config"]["scheme"]) for r in rounds] == [
        ("queued", 7, "uniform")
    ]
    round_id = rounds[0]["id"]
    _choose(page, "#prefloop-round-pick", f"round {round_id} · queued")
    _text_includes(page, "#prefloop-round-progress", "step 0 of 7")

    # A worker's progress, written as the trainer writes it: the page follows by itself.
    from sqlalchemy import create_engine, text

    engine = create_engine(live_server.settings.db_url)  # type: ignore[attr-defined]
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE training_rounds SET status='running', step=3, total_steps=7 WHERE id=:r"),
            {"r": round_id},
        )
        for step, loss in ((1, 0.69), (2, 0.65), (3, 0.6)):
            conn.execute(
                text(
                    "INSERT INTO round_metrics (round_id, step, loss, implicit_acc, "
                    "reward_margin, extra, created_at) VALUES (:r, :s, :l, 0.5, 0.1, '{}', "
                    "CURRENT_TIMESTAMP)"
                ),
                {"r": round_id, "s": step, "l": loss},
            )
    engine.dispose()
    _text_includes(page, "#prefloop-round-progress", "step 3 of 7 (43%)")
    page.wait_for_function(
        "() => document.querySelectorAll('#prefloop-round-curve canvas, #prefloop-round-curve svg').length > 0"
    )
    _screenshot(page, tmp_path, "admin-round-desktop")

    page.get_by_role("button", name="Cancel round…").click()
    page.locator("#prefloop-confirm-cancel").click()
    _text_includes(page, "#prefloop-admin-status", f"Round {round_id}: cancelled")
    assert _api(live_server, "GET", f"/rounds/{round_id}").json()["status"] == "cancelled"


def test_admin_publishes_a_candidate_from_its_gallery(
    live_server: LiveServer, page, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    _open_admin(page, live_server)
    vid = live_server.candidate_id
    _choose(page, "#prefloop-version-pick", f"version {vid} · {CANDIDATE} · candidate")
    _text_includes(page, "#prefloop-version-details", "heldout best · accuracy")
    page.wait_for_function(
        "() => [...document.querySelectorAll('#prefloop-version-gallery img')]"
        ".filter(i => i.complete && i.naturalWidth === 64).length >= 2"
    )
    details = page.locator("#prefloop-version-details").inner_text()
    assert "0.625" in details and "No A/B test" in details
    _screenshot(page, tmp_path, "admin-gallery-desktop")
    page.locator("#prefloop-publish").click()
    _text_includes(page, "#prefloop-admin-status", f"Version {vid}")
    assert _api(live_server, "GET", f"/versions/{vid}").json()["status"] == "published"
    _text_includes(page, "#prefloop-version-details", "published")
    # the base serves again (and the candidate stays a candidate-less parent for later tests)
    rolled = _api(live_server, "POST", f"/versions/{vid}/rollback")
    assert rolled.status_code == 200, rolled.text


def test_admin_bans_an_annotator_whose_next_request_is_refused(
    live_server: LiveServer, page
) -> None:  # type: ignore[no-untyped-def]
    token = live_server.token(*TO_BAN)
    assert httpx.get(
        f"{live_server.url}/api/v1/users/me", headers={"Authorization": f"Bearer {token}"}
    ).is_success
    _open_admin(page, live_server)
    _choose(page, "#prefloop-user-pick", f"{TO_BAN[0]} · active")
    page.locator("#prefloop-ban").click()
    _text_includes(page, "#prefloop-admin-status", f"{TO_BAN[0]} is now banned")
    refused = httpx.get(
        f"{live_server.url}/api/v1/pairs/next", headers={"Authorization": f"Bearer {token}"}
    )
    assert refused.status_code in (401, 403), refused.text
    _text_includes(page, "#prefloop-admin-users", "banned")
    _choose(page, "#prefloop-user-pick", f"{TO_BAN[0]} · banned")
    page.locator("#prefloop-unban").click()
    _text_includes(page, "#prefloop-admin-status", f"{TO_BAN[0]} is now active")
    assert live_server.token(*TO_BAN)  # may sign in again

    # a new account from the same section
    page.get_by_label("New username").fill("ann_created")
    page.get_by_label("Password", exact=True).last.fill("created-pw-1")
    page.get_by_role("button", name="Create account").click()
    _text_includes(page, "#prefloop-admin-status", "Created annotator ann_created")
    assert live_server.token("ann_created", "created-pw-1")


def test_admin_uploads_and_deactivates_prompts(
    live_server: LiveServer, page, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    _open_admin(page, live_server)
    before = _api(live_server, "GET", "/prompts").json()["count"]
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("a big green square on a white background\na tiny yellow star\n")
    page.locator("#prefloop-prompt-file input[type=file]").set_input_files(str(prompts_file))
    page.locator("#prefloop-upload-prompts").click()
    _text_includes(page, "#prefloop-admin-status", "2 new prompts, 0 already there")
    _text_includes(page, "#prefloop-admin-prompts", "a tiny yellow star")
    assert _api(live_server, "GET", "/prompts").json()["count"] == before + 2

    star = next(
        p
        for p in _api(live_server, "GET", "/prompts").json()["data"]
        if p["text"] == "a tiny yellow star"
    )
    _choose(page, "#prefloop-prompt-pick", f"{star['id']} · active · a tiny yellow star")
    page.locator("#prefloop-deactivate-prompt").click()
    _text_includes(page, "#prefloop-admin-status", f"Prompt {star['id']} is now inactive")
    inactive = _api(live_server, "GET", "/prompts?active=false").json()["data"]
    assert [p["text"] for p in inactive] == ["a tiny yellow star"]


@pytest.mark.parametrize("viewport", sorted(VIEWPORTS))
def test_both_pages_fit_the_viewport(
    live_server: LiveServer, page, tmp_path: Path, viewport: str
) -> None:  # type: ignore[no-untyped-def]
    width, height = VIEWPORTS[viewport]
    page.set_viewport_size({"width": width, "height": height})
    _open_admin(page, live_server)
    overflow = "() => document.documentElement.scrollWidth - document.documentElement.clientWidth"
    assert page.evaluate(overflow) <= 1, "the admin tab scrolls sideways"
    _screenshot(page, tmp_path, f"admin-{viewport}")
    page.get_by_role("tab", name="Annotate").click()
    page.wait_for_function(
        "() => document.querySelector('#prefloop-vote-left') && "
        "document.querySelector('#prefloop-guidelines').offsetParent !== null"
    )
    assert page.evaluate(overflow) <= 1, "the annotator page scrolls sideways"
    _screenshot(page, tmp_path, f"annotate-{viewport}")


def test_wrong_password_shows_an_error(live_server: LiveServer, page) -> None:  # type: ignore[no-untyped-def]
    _sign_in(page, live_server.url, ANNOTATOR[0], "not-the-password")
    page.wait_for_function(
        "() => document.querySelector('#prefloop-login-message').innerText.includes('Wrong')"
    )
    assert (
        page.locator("#prefloop-app").count() == 0 or not page.locator("#prefloop-app").is_visible()
    )


def _add_pairs(live_server: LiveServer, prompts: list[str]) -> None:
    from backend.db import Database
    from backend.models import PairKind
    from backend.services import images as image_service
    from backend.services import pairs as pair_service
    from backend.services import prompts as prompt_service
    from backend.services import versions as version_service
    from backend.storage import ImageStore

    settings = live_server.settings
    db = Database(settings.db_url, pool_size=1, max_overflow=0)  # type: ignore[attr-defined]
    with db.transaction() as session:
        version = version_service.serving_version(session)
        assert version is not None
        prompt_service.add_prompts(
            session, [prompt_service.PromptIn(p, "ui-test") for p in prompts]
        )
        rows, _ = prompt_service.list_prompts(session, offset=0, limit=100, active=None)
        for prompt in (r for r in rows if r.text in prompts):
            a, b = (
                image_service.store_image(
                    session,
                    ImageStore(settings.images_dir),  # type: ignore[attr-defined]
                    version_id=version.id,
                    prompt_id=prompt.id,
                    data=_shape_png((12 + 30 * k, 20), 8 + prompt.id % 5),
                    seed=100 * prompt.id + k,
                    cfg=3.0,
                    steps=20,
                    sampler="ddim",
                    width=64,
                    height=64,
                )
                for k in (0, 1)
            )
            pair_service.create_pair(
                session, kind=PairKind.within_version, image_a_id=a.id, image_b_id=b.id
            )
    db.dispose()


SHOWN = """() => [
  ...['#prefloop-left img', '#prefloop-right img'].map((s) => document.querySelector(s).src),
  document.querySelector('#prefloop-prompt').innerText,
]"""


def test_a_vote_that_is_not_saved_keeps_its_pair_on_screen(
    live_server: LiveServer, page, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """The click shows the preloaded next pair before the server answers; when the server keeps
    the pair (here: the account was banned meanwhile, 403), the page shows it again."""
    user = ("ann_swap", "annotator-pw-3")
    assert _api(
        live_server, "POST", "/users", json={"username": user[0], "password": user[1]}
    ).is_success
    _add_pairs(live_server, ["a green square in the middle", "a yellow star at the bottom"])
    _sign_in(page, live_server.url, *user)
    for selector in ("#prefloop-left img", "#prefloop-right img", ".prefloop-preload img"):
        page.wait_for_function(IMAGE_LOADED, arg=selector)
    page.wait_for_function(
        "() => [...document.querySelectorAll('.prefloop-preload img')]"
        ".filter(i => i.complete && i.naturalWidth > 0).length === 2"
    )
    before = page.evaluate(SHOWN)
    users = _api(live_server, "GET", "/users").json()["data"]
    uid = next(u["id"] for u in users if u["username"] == user[0])
    assert _api(live_server, "PATCH", f"/users/{uid}", json={"status": "banned"}).is_success

    page.wait_for_timeout(200)
    page.keyboard.press("1")
    _text_includes(page, "#prefloop-notice", "The vote was not saved")
    page.wait_for_timeout(300)  # let the page settle: the swap is undone, nothing else moves
    assert page.evaluate(SHOWN) == before
    _screenshot(page, tmp_path, "annotate-vote-not-saved")
