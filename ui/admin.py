"""The admin tab: dataset stats, rounds, versions, leaderboard, prompt import, export.

Functional rather than fancy. The tab is shown only to admins, but every action goes through
the API with the user's token, and the API is what enforces the role.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from prefloop_client.api import (
    ApiError,
    ApiUnavailable,
    ExportFormat,
    PrefloopClient,
    Unauthorized,
)
from ui.annotation import AnnotatorSession
from ui.tables import records_table, stats_table

ROUND_COLUMNS = (
    "id",
    "status",
    "progress",
    "step",
    "total_steps",
    "parent_version_id",
    "version_id",
    "snapshot_vote_count",
    "attempts",
    "created_at",
    "finished_at",
    "error",
    "metrics",
)
VERSION_COLUMNS = (
    "id",
    "name",
    "status",
    "parent_id",
    "created_by_round",
    "created_at",
    "published_at",
    "metrics",
)
LEADERBOARD_COLUMNS = (
    "version_id",
    "name",
    "status",
    "candidate",
    "score",
    "ci_low",
    "ci_high",
    "win_rate",
    "battles",
    "wins",
    "losses",
    "ties",
)
USER_COLUMNS = (
    "id",
    "username",
    "role",
    "status",
    "votes",
    "votes_today",
    "served",
    "gold_accuracy",
    "agreement_with_majority",
    "p_value",
    "outlier",
)
CURVE_SERIES = ("loss", "implicit_acc", "reward_margin")
#: Held-out evaluations (fixed timesteps and noise), stored in a metric row's ``extra``.
HELDOUT_SERIES = {"accuracy": "heldout_acc", "loss": "heldout_loss", "drift": "drift"}

PROMPT_CONTENT_TYPES = {
    ".csv": "text/csv",
    ".jsonl": "application/x-ndjson",
    ".txt": "text/plain",
    ".json": "application/json",
}
_EXPORT_EXTENSIONS = {"pickapic": ".parquet", "jsonl": ".jsonl"}
_SAFE_FILENAME = re.compile(r"[^A-Za-z0-9._-]+")

AUTO_REFRESH_S = 5.0


class AdminActions:
    """Admin operations over the API, each returning text for the tab's status line."""

    def __init__(self, client: PrefloopClient, export_dir: Path) -> None:
        self.client = client
        self.export_dir = export_dir

    def stats(self, token: str) -> dict[str, list[Any]]:
        return stats_table(self.client.stats(token))

    def rounds(self, token: str) -> dict[str, list[Any]]:
        return records_table(self.client.list_rounds(token), ROUND_COLUMNS, only=True)

    def versions(self, token: str) -> dict[str, list[Any]]:
        return records_table(self.client.list_versions(token), VERSION_COLUMNS, only=True)

    def leaderboard(self, token: str) -> dict[str, list[Any]]:
        return records_table(self.client.leaderboard(token), LEADERBOARD_COLUMNS)

    def users(self, token: str) -> dict[str, list[Any]]:
        return records_table(self.client.list_users(token), USER_COLUMNS)

    def curve(self, token: str, round_id: str) -> pd.DataFrame:
        """The round's logged steps in long form (step, value, series) for a line plot."""
        rid = _require_id(round_id, "round")
        metrics = self.client.round_metrics(token, rid)
        rows = [
            {"step": int(m["step"]), "value": float(m[name]), "series": name}
            for m in metrics
            for name in CURVE_SERIES
            if isinstance(m.get(name), (int, float)) and "step" in m
        ]
        for m in metrics:  # the held-out curve, where the round evaluated
            heldout = (m.get("extra") or {}).get("heldout") or {}
            rows += [
                {"step": int(m["step"]), "value": float(heldout[key]), "series": series}
                for key, series in HELDOUT_SERIES.items()
                if isinstance(heldout.get(key), (int, float)) and "step" in m
            ]
        return pd.DataFrame(rows, columns=["step", "value", "series"])

    def start_round(self, token: str, config_text: str) -> str:
        text = (config_text or "").strip()
        overrides: dict[str, Any] = {}
        if text:
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"The round config is not valid JSON: {exc}") from exc
            if not isinstance(parsed, dict):
                raise ValueError('The round config must be a JSON object, e.g. {"steps": 100}.')
            overrides = parsed
        round_id = self.client.start_round(token, overrides)
        return f"Round {round_id} queued."

    def cancel_round(self, token: str, round_id: str) -> str:
        rid = _require_id(round_id, "round")
        body = self.client.cancel_round(token, rid)
        status = body.get("status", "cancelling")
        return f"Round {rid}: {status}."

    def publish(self, token: str, version_id: str) -> str:
        vid = _require_id(version_id, "version")
        body = self.client.publish_version(token, vid)
        return f"Version {vid} is now {body.get('status', 'published')}."

    def retire(self, token: str, version_id: str) -> str:
        vid = _require_id(version_id, "version")
        body = self.client.retire_version(token, vid)
        return f"Version {vid} is now {body.get('status', 'retired')}."

    def upload_prompts(self, token: str, file_path: str | None) -> str:
        if not file_path:
            raise ValueError("Choose a prompt file first (CSV, JSONL, TXT or a JSON list).")
        path = Path(file_path)
        content_type = PROMPT_CONTENT_TYPES.get(path.suffix.lower())
        if content_type is None:
            raise ValueError(
                f"Unsupported file type {path.suffix!r}; use one of "
                + ", ".join(sorted(PROMPT_CONTENT_TYPES))
            )
        content = path.read_bytes()
        if path.suffix.lower() == ".json":
            try:
                items = json.loads(content)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ValueError(f"{path.name} is not valid JSON: {exc}") from exc
            if not isinstance(items, list):
                raise ValueError(f"{path.name} must hold a JSON list of prompts.")
            body = self.client.add_prompts(token, items)
        else:
            body = self.client.upload_prompts(token, path.name, content, content_type)
        summary = ", ".join(
            f"{key}: {value}" for key, value in body.items() if isinstance(value, (int, str))
        )
        return f"Uploaded {path.name}. {summary}".strip()

    def export(self, token: str, fmt: ExportFormat) -> tuple[str, str]:
        content, _content_type, filename = self.client.export(token, fmt)
        name = (
            _SAFE_FILENAME.sub("_", filename or "") or f"prefloop-export{_EXPORT_EXTENSIONS[fmt]}"
        )
        folder = self.export_dir / uuid.uuid4().hex
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / name
        target.write_bytes(content)
        return str(target), f"Export ready: {name} ({len(content):,} bytes)."


def _require_id(value: str, what: str) -> str:
    value = (value or "").strip()
    if not value:
        raise ValueError(f"Enter a {what} id.")
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", value):
        raise ValueError(f"{value!r} is not a valid {what} id.")
    return value


def _error_text(exc: Exception) -> str:
    if isinstance(exc, Unauthorized):
        return "Your session has expired. Sign out and sign in again."
    if isinstance(exc, ApiError):
        return f"Error: {exc.detail} (HTTP {exc.status_code})"
    return f"Error: {exc}"


def _token(session: AnnotatorSession | None) -> str:
    if session is None or session.signed_out:
        raise ValueError("Sign in first.")
    if not session.is_admin:
        raise ValueError("This tab is for admins.")
    return session.token


def build_admin_tab(
    actions: AdminActions, session_state: gr.State
) -> tuple[Callable[[AnnotatorSession | None], Any], list[Any]]:
    """Lay out the admin widgets in the current context.

    Returns ``(refresh, outputs)``: a function that reloads every view for a session, and the
    components it updates (for wiring it to sign-in).
    """
    status = gr.Markdown("", elem_id="prefloop-admin-status")
    with gr.Row():
        refresh_btn = gr.Button("Refresh", variant="secondary", size="sm")
        auto_refresh = gr.Checkbox(label=f"Auto-refresh every {AUTO_REFRESH_S:.0f} s", value=False)
    timer = gr.Timer(AUTO_REFRESH_S, active=False)

    with gr.Accordion("Dataset", open=True):
        stats_df = gr.Dataframe(
            label="Totals", interactive=False, elem_id="prefloop-admin-stats", max_height=360
        )

    with gr.Accordion("Training rounds", open=True):
        rounds_df = gr.Dataframe(
            label="Rounds", interactive=False, wrap=True, elem_id="prefloop-admin-rounds"
        )
        with gr.Row():
            round_config = gr.Textbox(
                label="Config overrides (JSON object, optional)",
                placeholder='{"steps": 200, "scheme": "dde"}',
                lines=2,
                scale=3,
                elem_id="prefloop-round-config",
            )
            start_round_btn = gr.Button(
                "Start round", variant="primary", scale=1, elem_id="prefloop-start-round"
            )
        with gr.Row():
            round_id = gr.Textbox(label="Round id", scale=2)
            curve_btn = gr.Button("Show loss curve", scale=1)
            cancel_round_btn = gr.Button("Cancel round", variant="stop", scale=1)
        curve_plot = gr.LinePlot(
            x="step", y="value", color="series", label="Training curve of the round", height=260
        )

    with gr.Accordion("Model versions", open=True):
        versions_df = gr.Dataframe(
            label="Versions", interactive=False, wrap=True, elem_id="prefloop-admin-versions"
        )
        with gr.Row():
            version_id = gr.Textbox(label="Version id", scale=2)
            publish_btn = gr.Button("Publish", variant="primary", scale=1)
            retire_btn = gr.Button("Retire", variant="stop", scale=1)

    with gr.Accordion("Leaderboard", open=True):
        leaderboard_df = gr.Dataframe(
            label="Bradley-Terry scores with 95% bootstrap intervals",
            interactive=False,
            wrap=True,
            elem_id="prefloop-admin-leaderboard",
        )

    with gr.Accordion("Annotators", open=False):
        users_df = gr.Dataframe(
            label="Volume and reliability (gold accuracy, agreement, outlier test)",
            interactive=False,
            wrap=True,
        )

    with gr.Accordion("Prompts and data", open=True):
        with gr.Row():
            prompt_file = gr.File(
                label="Prompt file (CSV, JSONL, TXT, JSON list)",
                file_types=sorted(PROMPT_CONTENT_TYPES),
                type="filepath",
                scale=2,
                elem_id="prefloop-prompt-file",
            )
            upload_btn = gr.Button(
                "Upload prompts", variant="primary", scale=1, elem_id="prefloop-upload-prompts"
            )
        with gr.Row():
            export_format = gr.Radio(
                choices=["pickapic", "jsonl"], value="pickapic", label="Export format", scale=1
            )
            export_btn = gr.Button("Prepare export", scale=1)
            export_file = gr.File(label="Export download", interactive=False, scale=2)

    views = [stats_df, rounds_df, versions_df, leaderboard_df, users_df, status]

    def refresh(session: AnnotatorSession | None) -> Any:
        if session is None or session.signed_out or not session.is_admin:
            return gr.skip()
        errors: list[str] = []
        updates: dict[Any, Any] = {}
        loaders: list[tuple[Any, Callable[[str], Any]]] = [
            (stats_df, actions.stats),
            (rounds_df, actions.rounds),
            (versions_df, actions.versions),
            (leaderboard_df, actions.leaderboard),
            (users_df, actions.users),
        ]
        for component, load in loaders:
            try:
                updates[component] = load(session.token)
            except (ApiError, ApiUnavailable) as exc:
                errors.append(_error_text(exc))
        updates[status] = " ".join(dict.fromkeys(errors)) if errors else ""
        return updates

    def run_action(action: Callable[[str], str], session: AnnotatorSession | None):
        try:
            message = action(_token(session))
        except (ApiError, ApiUnavailable, ValueError, OSError) as exc:
            return {status: _error_text(exc)}
        updates = refresh(session)
        if not isinstance(updates, dict):
            updates = {}
        updates[status] = message
        return updates

    def show_curve(session: AnnotatorSession | None, rid: str) -> Any:
        try:
            return {curve_plot: actions.curve(_token(session), rid)}
        except (ApiError, ApiUnavailable, ValueError) as exc:
            return {status: _error_text(exc)}

    def auto_refresh_tick(session: AnnotatorSession | None, rid: str) -> Any:
        updates = refresh(session)
        if isinstance(updates, dict) and (rid or "").strip():
            updates.update(show_curve(session, rid))
        return updates

    # The UI's event handlers are not an API (the FastAPI routes are): keep them private.
    private: dict[str, Any] = {"api_visibility": "private"}
    refresh_btn.click(refresh, inputs=[session_state], outputs=views, **private)
    curve_btn.click(
        show_curve, inputs=[session_state, round_id], outputs=[curve_plot, status], **private
    )
    timer.tick(
        auto_refresh_tick,
        inputs=[session_state, round_id],
        outputs=[*views, curve_plot],
        show_progress="hidden",
        **private,
    )
    auto_refresh.change(
        lambda on: gr.Timer(active=bool(on)), inputs=[auto_refresh], outputs=[timer], **private
    )
    start_round_btn.click(
        lambda s, cfg: run_action(lambda t: actions.start_round(t, cfg), s),
        inputs=[session_state, round_config],
        outputs=views,
        **private,
    )
    cancel_round_btn.click(
        lambda s, rid: run_action(lambda t: actions.cancel_round(t, rid), s),
        inputs=[session_state, round_id],
        outputs=views,
        **private,
    )
    publish_btn.click(
        lambda s, vid: run_action(lambda t: actions.publish(t, vid), s),
        inputs=[session_state, version_id],
        outputs=views,
        **private,
    )
    retire_btn.click(
        lambda s, vid: run_action(lambda t: actions.retire(t, vid), s),
        inputs=[session_state, version_id],
        outputs=views,
        **private,
    )
    upload_btn.click(
        lambda s, f: run_action(lambda t: actions.upload_prompts(t, f), s),
        inputs=[session_state, prompt_file],
        outputs=views,
        **private,
    )

    def on_export(session: AnnotatorSession | None, fmt: ExportFormat):
        try:
            path, message = actions.export(_token(session), fmt)
        except (ApiError, ApiUnavailable, ValueError, OSError) as exc:
            return {status: _error_text(exc)}
        return {export_file: path, status: message}

    export_btn.click(
        on_export,
        inputs=[session_state, export_format],
        outputs=[export_file, status],
        **private,
    )
    return refresh, views
