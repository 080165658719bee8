"""Prefloop's Gradio UI: the annotator page and the admin tab.

The UI process holds no model and no storage (FastChat's arena pattern). Everything goes to
the API over HTTP through :class:`prefloop_client.api.PrefloopClient`.

Mounting: ``prefloop serve`` calls :func:`build_ui` and mounts the result with
``gradio.mount_gradio_app(app, build_ui(api_base_url), path="/")``. Because the mount call
owns ``css=`` / ``js=``, the page's CSS and keyboard shortcuts are installed by a page-load
script registered here, so they work whatever the mount passes.

Images: the API's image endpoint requires the user's bearer token, which an ``<img src>``
cannot send. The UI server fetches the bytes with the token (unchanged, no re-encoding) into
a local cache and gives Gradio file paths; the browser loads them from the UI's own origin.
The next pair and its images are fetched while the current one is on screen, and pushed into
hidden preload images so the browser has them cached before the vote. The vote click shows
them at once, before the server answers (:data:`ui.shortcuts.VOTE_CLICK_JS`); the server's
answer then confirms that pair, or, when it kept the pair on screen (the vote was not saved),
the click's swap is undone (:data:`ui.shortcuts.VOTE_DONE_JS`).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import gradio as gr

from prefloop_client.api import (
    ApiError,
    ApiUnavailable,
    Choice,
    Forbidden,
    NotFound,
    PrefloopClient,
    RateLimited,
    Unauthorized,
)
from ui.admin import AdminActions, build_admin_tab
from ui.annotation import AnnotationDesk, AnnotatorSession, TaskView
from ui.guidelines import DEFAULT_GUIDELINES
from ui.image_store import ImageStore
from ui.shortcuts import MARK_SHOWN_JS, VOTE_ACTIONS, VOTE_CLICK_JS, VOTE_DONE_JS, page_load_js
from ui.tables import escape_markdown

log = logging.getLogger(__name__)

#: Files older than this are removed from Gradio's cache (checked every hour).
CACHE_MAX_AGE_S = 6 * 3600


def default_cache_root() -> Path:
    """Where the UI keeps fetched images and exports: inside Gradio's upload folder.

    That folder is ``GRADIO_TEMP_DIR`` (set it under the data directory) or the system temp
    dir; Gradio is allowed to serve files from it.
    """
    base = os.environ.get("GRADIO_TEMP_DIR") or str(Path(tempfile.gettempdir()) / "gradio")
    return Path(base) / "prefloop-ui"


def _notice_markdown(view: TaskView) -> str:
    if view.kind == "waiting":
        wait = (
            f"⏳ **No pair ready — retrying in {view.retry_in_s} s.**"
            if view.retry_in_s > 0
            else "⏳ **No pair ready — retrying now…**"
        )
        return f"{wait}\n\n{view.notice}" if view.notice else wait
    if not view.notice:
        return ""
    icon = {"info": "ℹ️", "warning": "⚠️", "error": "❌"}[view.level]
    return f"{icon} {view.notice}"


def _progress_markdown(view: TaskView) -> str:
    """The annotator's own progress; skips are submissions too, and counted as such."""
    votes = view.votes_this_session
    noun = "vote" if votes == 1 else "votes"
    text = f"Signed in as **{escape_markdown(view.username)}** · **{votes}** {noun} this session"
    if view.skips_this_session:
        text += f" ({view.skips_this_session} skipped)"
    if view.votes_today is not None:
        text += f" · **{view.votes_today}** today"
    return text


def _sign_in_error(exc: Exception) -> str:
    if isinstance(exc, Unauthorized):
        return "❌ Wrong username or password."
    if isinstance(exc, RateLimited):
        return f"❌ Too many attempts: {exc.detail}"
    if isinstance(exc, (Forbidden, NotFound)):
        return f"❌ {exc.detail}"
    if isinstance(exc, ApiError):
        return f"❌ {exc.detail} (HTTP {exc.status_code})"
    if isinstance(exc, ApiUnavailable):
        return f"❌ The server is unavailable: {exc}"
    return f"❌ {exc}"


def build_ui(
    api_base_url: str,
    *,
    guidelines_markdown: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    request_timeout_s: float = 15.0,
) -> gr.Blocks:
    """Build the Prefloop UI talking to the API at ``api_base_url``.

    Args:
        api_base_url: the API server's root URL as seen from this process
            (``http://127.0.0.1:8000``; a trailing ``/api/v1`` is accepted too).
        guidelines_markdown: the annotation guidelines shown beside the task.
        cache_dir: where fetched images and exports are kept; must be a folder Gradio may
            serve from (under ``GRADIO_TEMP_DIR``, the system temp dir or the working dir).
        request_timeout_s: timeout of each API call.
    """
    client = PrefloopClient(api_base_url, timeout_s=request_timeout_s)
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    images = ImageStore(root / "images")
    desk = AnnotationDesk(client, images)
    admin_actions = AdminActions(client, root / "exports", images)

    with gr.Blocks(
        title="Prefloop",
        analytics_enabled=False,
        delete_cache=(3600, CACHE_MAX_AGE_S),
    ) as demo:
        session_state = gr.State(None)

        with gr.Row(equal_height=True):
            gr.Markdown("## Prefloop", elem_id="prefloop-title")
            progress_md = gr.Markdown("", elem_id="prefloop-progress")
            sign_out_btn = gr.Button(
                "Sign out", size="sm", visible=False, scale=0, elem_id="prefloop-sign-out"
            )

        with gr.Column(visible=True, elem_id="prefloop-login") as login_col:
            gr.Markdown("Sign in to start judging image pairs.")
            username_box = gr.Textbox(label="Username", elem_id="prefloop-username", max_lines=1)
            password_box = gr.Textbox(
                label="Password", type="password", elem_id="prefloop-password", max_lines=1
            )
            with gr.Row():
                sign_in_btn = gr.Button("Sign in", variant="primary", elem_id="prefloop-sign-in")
                register_btn = gr.Button("Create account", elem_id="prefloop-register")
            login_msg = gr.Markdown("", elem_id="prefloop-login-message")

        with gr.Column(visible=False, elem_id="prefloop-app") as app_col:
            with gr.Tabs():
                with gr.Tab("Annotate", id="annotate"):
                    with gr.Row():
                        with gr.Column(scale=3):
                            prompt_md = gr.Markdown("", elem_id="prefloop-prompt")
                            with gr.Row(equal_height=True):
                                left_img = gr.Image(
                                    label="Left",
                                    type="filepath",
                                    interactive=False,
                                    buttons=["fullscreen"],
                                    elem_id="prefloop-left",
                                    elem_classes=["prefloop-side"],
                                    height=420,
                                )
                                right_img = gr.Image(
                                    label="Right",
                                    type="filepath",
                                    interactive=False,
                                    buttons=["fullscreen"],
                                    elem_id="prefloop-right",
                                    elem_classes=["prefloop-side"],
                                    height=420,
                                )
                            with gr.Row():
                                vote_buttons = {
                                    action.choice: gr.Button(
                                        action.button_text,
                                        variant="primary"
                                        if action.choice in ("left", "right")
                                        else "secondary",
                                        elem_id=action.elem_id,
                                        interactive=False,
                                    )
                                    for action in VOTE_ACTIONS
                                }
                            notice_md = gr.Markdown("", elem_id="prefloop-notice")
                        with gr.Column(scale=1, min_width=260):
                            gr.Markdown(
                                guidelines_markdown or DEFAULT_GUIDELINES,
                                elem_id="prefloop-guidelines",
                            )
                with gr.Tab("Admin", id="admin", visible=False) as admin_tab:
                    admin_refresh, admin_views = build_admin_tab(admin_actions, session_state)

        # Hidden plumbing: the shown pair's token (what a click refers to), the browser-measured
        # latency, the preload images for the next pair, and the "no pair ready" retry timer.
        token_box = gr.Textbox("", visible="hidden", elem_id="prefloop-token")
        latency_box = gr.Number(-1, visible="hidden", elem_id="prefloop-latency")
        preload_left = gr.Image(
            type="filepath", interactive=False, elem_classes=["prefloop-preload"], show_label=False
        )
        preload_right = gr.Image(
            type="filepath", interactive=False, elem_classes=["prefloop-preload"], show_label=False
        )
        # What the preload images are: the pair after the one whose token is "after", and its
        # prompt (JSON). The vote click shows them at once when "after" is the pair on screen.
        preload_info = gr.Textbox("", visible="hidden", elem_id="prefloop-preload-info")
        retry_timer = gr.Timer(1.0, active=False)

        task_outputs: list[Any] = [
            session_state,
            login_col,
            app_col,
            admin_tab,
            sign_out_btn,
            login_msg,
            progress_md,
            prompt_md,
            left_img,
            right_img,
            notice_md,
            token_box,
            retry_timer,
            *vote_buttons.values(),
        ]

        def render(view: TaskView) -> dict[Any, Any]:
            if view.kind == "signed_out":
                return {
                    session_state: None,
                    login_col: gr.Column(visible=True),
                    app_col: gr.Column(visible=False),
                    admin_tab: gr.Tab(visible=False),
                    sign_out_btn: gr.Button(visible=False),
                    login_msg: f"⚠️ {view.notice}" if view.notice else "",
                    progress_md: "",
                    retry_timer: gr.Timer(active=False),
                    token_box: "",
                }
            showing = view.kind == "pair"
            updates: dict[Any, Any] = {
                progress_md: _progress_markdown(view),
                prompt_md: f"**Prompt:** {escape_markdown(view.prompt)}" if showing else "",
                left_img: view.left_path if showing else None,
                right_img: view.right_path if showing else None,
                notice_md: _notice_markdown(view),
                token_box: view.token,
                retry_timer: gr.Timer(active=view.kind == "waiting"),
            }
            for button in vote_buttons.values():
                updates[button] = gr.Button(interactive=showing)
            return updates

        def signed_in(session: AnnotatorSession) -> dict[Any, Any]:
            updates = render(desk.start(session))
            updates.update(
                {
                    session_state: session,
                    login_col: gr.Column(visible=False),
                    app_col: gr.Column(visible=True),
                    admin_tab: gr.Tab(visible=session.is_admin),
                    sign_out_btn: gr.Button(visible=True),
                    login_msg: "",
                }
            )
            return updates

        def on_sign_in(username: str, password: str) -> dict[Any, Any]:
            try:
                session = desk.sign_in(username or "", password or "")
            except (ApiError, ApiUnavailable, ValueError) as exc:
                return {login_msg: _sign_in_error(exc)}
            return signed_in(session) | {password_box: ""}

        def on_register(username: str, password: str) -> dict[Any, Any]:
            try:
                session = desk.register(username or "", password or "")
            except (Forbidden, NotFound):
                return {login_msg: "❌ Sign-up is closed here; ask an admin for an account."}
            except (ApiError, ApiUnavailable, ValueError) as exc:
                return {login_msg: _sign_in_error(exc)}
            return signed_in(session) | {password_box: ""}

        def on_sign_out(session: AnnotatorSession | None) -> dict[Any, Any]:
            if session is not None:
                session.signed_out = True
            updates = render(TaskView(kind="signed_out"))
            updates[login_msg] = "Signed out."
            return updates

        def on_prefetch(session: AnnotatorSession | None) -> Any:
            if session is None:
                return gr.skip()
            prepared = desk.prefetch(session)
            if prepared is None:
                return gr.skip()
            current = session.current
            info = {
                "after": current.client_vote_id if current is not None else "",
                "prompt": prepared.pair.prompt,
            }
            return {
                preload_left: prepared.left_path,
                preload_right: prepared.right_path,
                preload_info: json.dumps(info),
            }

        def on_vote(
            choice: Choice,
            session: AnnotatorSession | None,
            shown_token: str,
            latency_ms: float | None,
            _preload_info: str = "",
        ) -> Any:
            """The one vote handler; each button binds its ``choice``. (The preload info is an
            input for the click's script only.)"""
            if session is None:
                return render(TaskView(kind="signed_out", notice="Please sign in."))
            client_latency = None if latency_ms is None or latency_ms < 0 else float(latency_ms)
            view = desk.vote(session, choice, shown_token or "", client_latency)
            if view is None:
                return gr.skip()
            return render(view)

        def on_tick(session: AnnotatorSession | None) -> Any:
            if session is None:
                return {retry_timer: gr.Timer(active=False)}
            view = desk.tick(session)
            if view is None:
                return gr.skip()
            return render(view)

        # The UI's event handlers are not an API (the FastAPI routes are): keep them private.
        private: dict[str, Any] = {"api_visibility": "private"}
        annotate_events: dict[str, Any] = {
            "concurrency_limit": None,
            "show_progress": "hidden",
            **private,
        }
        prefetch_args: dict[str, Any] = {
            "fn": on_prefetch,
            "inputs": [session_state],
            "outputs": [preload_left, preload_right, preload_info],
            **annotate_events,
        }

        login_outputs = [*task_outputs, password_box]
        for trigger in (sign_in_btn.click, password_box.submit):
            trigger(
                on_sign_in,
                inputs=[username_box, password_box],
                outputs=login_outputs,
                concurrency_limit=None,
                **private,
            ).then(**prefetch_args).then(
                admin_refresh, inputs=[session_state], outputs=admin_views, **private
            )
        register_btn.click(
            on_register,
            inputs=[username_box, password_box],
            outputs=login_outputs,
            concurrency_limit=None,
            **private,
        ).then(**prefetch_args).then(
            admin_refresh, inputs=[session_state], outputs=admin_views, **private
        )
        sign_out_btn.click(on_sign_out, inputs=[session_state], outputs=task_outputs, **private)

        for choice, button in vote_buttons.items():
            button.click(
                functools.partial(on_vote, choice),
                inputs=[session_state, token_box, latency_box, preload_info],
                outputs=task_outputs,
                js=VOTE_CLICK_JS,
                queue=False,
                **annotate_events,
            ).then(None, inputs=[token_box], js=VOTE_DONE_JS, **private).then(**prefetch_args)

        retry_timer.tick(
            on_tick, inputs=[session_state], outputs=task_outputs, **annotate_events
        ).then(**prefetch_args)

        token_box.change(None, js=MARK_SHOWN_JS, **private)
        demo.load(None, js=page_load_js(), **private)

    return demo
