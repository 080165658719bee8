"""The admin tab: the dataset, a start-round form (with the chosen credit scheme's plot over
timesteps beside it), live rounds, versions with their validation grid, the leaderboard,
annotators (ban / unban, new accounts), prompts and export.

Nothing here shows raw JSON: records become tables with named columns, metrics become labelled
fields, a round's config is a form filled in from ``GET /rounds/config-defaults``. The tab is
shown only to admins, but every action goes through the API with the user's token, and the API
is what enforces the role.
"""

from __future__ import annotations

import functools
import html
import json
import math
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from prefloop_client.api import (
    ApiError,
    ApiUnavailable,
    ExportFormat,
    ImageRef,
    NotFound,
    PrefloopClient,
    Unauthorized,
)
from ui.annotation import AnnotatorSession
from ui.image_store import ImageStore
from ui.tables import cell, escape_markdown

#: (key, header) of each table; a key may be dotted (``metrics.heldout_best.accuracy``).
ROUND_COLUMNS = (
    ("id", "round"),
    ("status", "status"),
    ("progress_text", "progress"),
    ("parent_version_id", "parent"),
    ("version_id", "new version"),
    ("snapshot_vote_count", "votes"),
    ("config.scheme", "scheme"),
    ("metrics.heldout_best.accuracy", "held-out acc."),
    ("created_at", "created"),
    ("finished_at", "finished"),
    ("error", "error"),
)
VERSION_COLUMNS = (
    ("id", "version"),
    ("name", "name"),
    ("status", "status"),
    ("parent_id", "parent"),
    ("created_by_round", "round"),
    ("metrics.heldout_best.accuracy", "held-out acc."),
    ("metrics.judge_delta", "judge change"),
    ("published_at", "published"),
)
LEADERBOARD_COLUMNS = (
    ("version_id", "version"),
    ("name", "name"),
    ("status", "status"),
    ("score", "score"),
    ("ci_low", "95% low"),
    ("ci_high", "95% high"),
    ("win_rate", "win rate"),
    ("battles", "battles"),
)
USER_COLUMNS = (
    ("id", "id"),
    ("username", "username"),
    ("role", "role"),
    ("status", "status"),
    ("votes", "votes"),
    ("votes_today", "today"),
    ("gold_accuracy", "gold accuracy"),
    ("agreement_with_majority", "agreement"),
    ("krippendorff_alpha", "α"),
    ("flags", "flagged"),
)
PROMPT_COLUMNS = (("id", "id"), ("active", "active"), ("source", "source"), ("text", "prompt"))

#: The start-round form's main fields (the rest are under "Advanced"): key -> label.
FORM_FIELDS: dict[str, str] = {
    "scheme": "Credit scheme",
    "timestep_mode": "Timestep mode",
    "beta": "β (KL strength)",
    "learning_rate": "Learning rate",
    "steps": "Steps",
    "lora_rank": "LoRA rank",
    "holdout_fraction": "Hold-out share",
    "batch_size": "Batch size (pairs)",
}
CHOICE_FIELDS = ("scheme", "timestep_mode")
INTEGER_FIELDS = ("steps", "lora_rank", "batch_size")

CURVE_SERIES = ("loss", "implicit_acc", "reward_margin")
#: Held-out evaluations (fixed timesteps and noise), stored in a metric row's ``extra``.
#: ``fidelity``: the fidelity probe's paired change against the parent (docs/rounds.md).
HELDOUT_SERIES = {
    "accuracy": "heldout_acc",
    "loss": "heldout_loss",
    "drift": "drift",
    "fidelity": "fidelity_change",
}
FINISHED_ROUND = ("succeeded", "failed", "cancelled")

PROMPT_CONTENT_TYPES = {
    ".csv": "text/csv",
    ".jsonl": "application/x-ndjson",
    ".txt": "text/plain",
    ".json": "application/json",
}
_EXPORT_EXTENSIONS = {"pickapic": ".parquet", "jsonl": ".jsonl"}
_SAFE_FILENAME = re.compile(r"[^A-Za-z0-9._-]+")
_FIELD_ERROR = re.compile(r"^config\.([A-Za-z0-9_]+)(?:\.[^:]*)?:\s*(.*)$")

AUTO_REFRESH_S = 5.0
#: The credit plot's two lines. The names stay the same whatever the scheme: Gradio's LinePlot
#: keeps the colour domain of its first value and draws no series it did not have then.
CREDIT_SERIES = "chosen scheme"
#: The reference line: Diffusion-DPO's uniform credit.
CREDIT_REFERENCE = "uniform (W = 1)"


class FormError(ValueError):
    """The start-round form has bad values; ``fields`` maps a config key to its message."""

    def __init__(self, fields: Mapping[str, str], message: str = "") -> None:
        self.fields = dict(fields)
        super().__init__(message or "; ".join(f"{k}: {v}" for k, v in self.fields.items()))


@dataclass(frozen=True)
class RoundForm:
    """What the start-round form needs: the defaults, the choices and each field's help."""

    base_model: str
    defaults: dict[str, Any]
    choices: dict[str, list[str]]
    help: dict[str, str]

    def advanced_rows(self) -> list[list[str]]:
        """``[field, value, about]`` for every field not in :data:`FORM_FIELDS`."""
        return [
            [key, _text(value), self.help.get(key, "")]
            for key, value in self.defaults.items()
            if key not in FORM_FIELDS
        ]


def _text(value: Any) -> str:
    """A config value as an editable text (``null`` for none, JSON for the rest)."""
    if isinstance(value, str):
        return value
    return json.dumps(value)


def _parse_text(text: str) -> Any:
    text = text.strip()
    try:
        return json.loads(text)
    except ValueError:
        return text


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    return bool(a == b)


def form_overrides(
    defaults: Mapping[str, Any],
    fields: Mapping[str, Any],
    advanced: Sequence[Sequence[Any]],
) -> dict[str, Any]:
    """The config overrides of a filled-in form: only the values that differ from the defaults.

    ``fields`` are the main fields' values (None: left empty, keep the default); ``advanced``
    the rows ``[field, value text, about]`` of the advanced table (an empty text keeps the
    default; ``null`` means none; a value is read as JSON when it parses, else as text).
    Raises :class:`FormError` for a field the config does not have.
    """
    overrides: dict[str, Any] = {}
    for key, value in fields.items():
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        if key in INTEGER_FIELDS and isinstance(value, float) and value.is_integer():
            value = int(value)
        if key not in defaults or not _same(value, defaults[key]):
            overrides[key] = value
    unknown: dict[str, str] = {}
    for row in advanced:
        if len(row) < 2 or row[0] is None or str(row[0]).strip() == "":
            continue
        key, text = str(row[0]).strip(), "" if row[1] is None else str(row[1])
        if key not in defaults:
            unknown[key] = "not a round setting"
            continue
        if text.strip() == "":
            continue
        value = _parse_text(text)
        if not _same(value, defaults[key]):
            overrides[key] = value
    if unknown:
        raise FormError(unknown)
    return overrides


def field_errors(detail: str) -> dict[str, str]:
    """The API's 422 detail (``config.beta: Input should be ...; config.steps: ...``) by field;
    what names no config field is kept under ``""``."""
    errors: dict[str, str] = {}
    for part in detail.split("; "):
        match = _FIELD_ERROR.match(part.strip())
        key, message = (match.group(1), match.group(2)) if match else ("", part.strip())
        errors[key] = f"{errors[key]}; {message}" if key in errors else message
    return errors


def _get(record: Mapping[str, Any], dotted: str) -> Any:
    value: Any = record
    for part in dotted.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def table(records: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]]) -> dict:
    """Records as a ``gr.Dataframe`` value with readable headers and cells."""
    headers = [header for _, header in columns]
    data = [[_readable(_get(r, key)) for key, _ in columns] for r in records]
    return {"headers": headers, "data": data or [["" for _ in headers]]}


def _readable(value: Any) -> Any:
    """A table cell that is never JSON: mappings and lists become ``k: v`` / comma text."""
    if isinstance(value, Mapping):
        return ", ".join(f"{k}: {_readable(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(str(_readable(v)) for v in value)
    return cell(value)


def _label(key: str) -> str:
    return key.replace("_", " ").replace(".", " · ")


def _flat(mapping: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in mapping.items():
        if isinstance(value, Mapping) and value:
            rows.extend(_flat(value, f"{prefix}{key}."))
        else:
            rows.append((f"{prefix}{key}", _readable(value)))
    return rows


def metrics_markdown(metrics: Mapping[str, Any]) -> str:
    """A version's or a round's metrics as a list of labelled fields."""
    rows = _flat(metrics)
    if not rows:
        return "_No metrics yet._"
    return "\n".join(
        f"- **{escape_markdown(_label(k))}:** {escape_markdown(str(v))}" for k, v in rows
    )


def ab_markdown(ab: Mapping[str, Any]) -> str:
    """The version's A/B tests against its parent, in words."""
    lines = []
    for phase, title in (
        ("gate", "Blind A/B before serving"),
        ("live", "Live A/B since publishing"),
    ):
        test = ab.get(phase)
        if not isinstance(test, Mapping):
            continue
        rate = test.get("win_rate")
        interval = test.get("interval") or []
        ci = f" [{interval[0]:.2f}, {interval[1]:.2f}]" if len(interval) == 2 else ""
        rate_text = f"win rate {rate:.2f}{ci}" if isinstance(rate, (int, float)) else "no votes yet"
        lines.append(
            f"- **{title}** (vs version {test.get('parent_id')}): {test.get('state')} — "
            f"{test.get('battles', 0)} votes: {test.get('wins', 0)} wins, "
            f"{test.get('losses', 0)} losses, {test.get('ties', 0)} ties; {rate_text}"
            + (f". {escape_markdown(str(test['reason']))}" if test.get("reason") else "")
        )
    return "\n".join(lines) if lines else "_No A/B test for this version._"


def progress_html(rnd: Mapping[str, Any]) -> str:
    """A round's status and a progress bar."""
    step, total = int(rnd.get("step") or 0), max(1, int(rnd.get("total_steps") or 1))
    status = html.escape(str(rnd.get("status")))
    pct = 100.0 * min(step, total) / total
    error = f" — {html.escape(str(rnd['error']))}" if rnd.get("error") else ""
    return (
        f'<div id="prefloop-round-progress-text">Round {int(rnd["id"])}: <b>{status}</b>, '
        f"step {step} of {total} ({pct:.0f}%){error}</div>"
        f'<progress value="{step}" max="{total}" style="width:100%"></progress>'
    )


def overview_markdown(stats: Mapping[str, Any]) -> str:
    """``GET /stats`` totals as sentences: volume, rates, pairs ready, models."""
    t = stats.get("totals") or {}
    votes = int(t.get("votes") or 0)
    by_choice = t.get("votes_by_choice") or {}

    def rate(choice: str) -> str:
        return f"{100.0 * by_choice.get(choice, 0) / votes:.1f}%" if votes else "–"

    def counts(mapping: Any) -> str:
        if not isinstance(mapping, Mapping) or not mapping:
            return "none"
        return ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in mapping.items())

    return "\n".join(
        [
            f"- **Votes:** {votes} ({t.get('votes_today', 0)} today) from "
            f"{t.get('voters', 0)} annotators; {t.get('annotators_active_today', 0)} active today",
            f"- **Choices:** ties {rate('tie')}, both bad {rate('both_bad')}, skips {rate('skip')}",
            f"- **Pairs ready to judge:** {t.get('pairs_active', 0)} "
            f"(made so far: {counts(t.get('pairs'))})",
            f"- **Prompts:** {t.get('prompts', 0)} · **images:** {t.get('images', 0)}",
            f"- **Versions:** {counts(t.get('versions'))} · **rounds:** {counts(t.get('rounds'))}",
        ]
    )


def votes_per_hour_frame(stats: Mapping[str, Any]) -> pd.DataFrame:
    """``totals.votes_per_hour`` as (hour, votes) rows for a plot (hours as UTC timestamps)."""
    rows = (stats.get("totals") or {}).get("votes_per_hour") or []
    frame = pd.DataFrame(
        [(r["hour"], int(r["votes"])) for r in rows if "hour" in r and "votes" in r],
        columns=["hour", "votes"],
    )
    frame["hour"] = pd.to_datetime(frame["hour"], utc=True).dt.tz_localize(None)
    return frame


def credit_frame(curve: Mapping[str, Any]) -> pd.DataFrame:
    """``GET /rounds/credit`` as (timestep, credit, series) rows for a line plot: the scheme's
    weight W (:data:`CREDIT_SERIES`) and, for comparison, the uniform W = 1."""
    points = list(zip(curve.get("timesteps") or [], curve.get("weight") or [], strict=False))
    rows = [(float(t), float(w), CREDIT_SERIES) for t, w in points]
    if points:
        first, last = float(points[0][0]), float(points[-1][0])
        rows += [(first, 1.0, CREDIT_REFERENCE), (last, 1.0, CREDIT_REFERENCE)]
    return pd.DataFrame(rows, columns=["timestep", "credit", "series"])


def credit_markdown(curve: Mapping[str, Any]) -> str:
    """The credit curve in words: where the scheme puts the preference loss."""
    scheme = escape_markdown(str(curve.get("scheme", "")))
    model = escape_markdown(str(curve.get("base_model", "")))
    total = int(curve.get("num_train_timesteps") or 0)
    timesteps = [float(t) for t in curve.get("timesteps") or []]
    weight = [float(w) for w in curve.get("weight") or []]
    head = (
        f"Credit W of **{scheme}** over the {total} timesteps of {model} (mean 1; timestep 0 "
        f"is the least noise, {max(total - 1, 0)} the most)."
    )
    if not weight or len(weight) != len(timesteps):
        return head
    if max(weight) - min(weight) < 1e-9:
        return f"{head} Every timestep counts the same."
    mass = sum(weight)
    running, median = 0.0, timesteps[-1]
    for t, w in zip(timesteps, weight, strict=True):
        running += w
        if running >= mass / 2:
            median = t
            break
    peak = max(range(len(weight)), key=weight.__getitem__)
    return (
        f"{head} Half the credit lies on timesteps up to about {median:.0f}; the most, "
        f"W ≈ {weight[peak]:.2g}, at about {timesteps[peak]:.0f}."
    )


class AdminActions:
    """Admin operations over the API; each returns what a widget shows."""

    def __init__(self, client: PrefloopClient, export_dir: Path, images: ImageStore) -> None:
        self.client = client
        self.export_dir = export_dir
        self.images = images

    # -- reading -------------------------------------------------------------------------------

    def overview(self, token: str) -> tuple[str, pd.DataFrame]:
        """The dataset in words, and the votes of each of the last 24 hours."""
        stats = self.client.stats(token)
        return overview_markdown(stats), votes_per_hour_frame(stats)

    def rounds(self, token: str) -> list[dict[str, Any]]:
        rounds = self.client.list_rounds(token, limit=50)
        for r in rounds:
            total = max(1, int(r.get("total_steps") or 1))
            r["progress_text"] = f"{100 * min(int(r.get('step') or 0), total) / total:.0f}%"
        return rounds

    def versions(self, token: str) -> list[dict[str, Any]]:
        return self.client.list_versions(token, limit=50)

    def leaderboard(self, token: str) -> dict:
        return table(self.client.leaderboard(token), LEADERBOARD_COLUMNS)

    def users(self, token: str) -> list[dict[str, Any]]:
        return self.client.list_users(token, limit=500)

    def prompts(self, token: str, search: str = "") -> list[dict[str, Any]]:
        """Up to 200 of the first 500 prompts whose text holds ``search`` (any case)."""
        rows = self.client.list_prompts(token, limit=500)
        needle = (search or "").strip().lower()
        if needle:
            rows = [r for r in rows if needle in str(r.get("text", "")).lower()]
        return rows[:200]

    def set_prompt_active(self, token: str, prompt_id: Any, active: bool) -> str:
        pid = _require_id(prompt_id, "prompt")
        if not pid.isdigit():
            raise ValueError("Choose a prompt.")
        prompt = self.client.set_prompt_active(token, int(pid), active)
        state = "active" if prompt.get("active") else "inactive"
        return f"Prompt {prompt.get('id')} is now {state}."

    def round_form(self, token: str) -> RoundForm:
        body = self.client.round_config_defaults(token)
        schema = self.client.round_config_schema(token)
        props = schema.get("properties") or {}
        choices = {
            key: [str(c) for c in (props.get(key) or {}).get("enum") or []] for key in CHOICE_FIELDS
        }
        help_ = {key: str((p or {}).get("description") or "") for key, p in props.items()}
        return RoundForm(
            base_model=str(body.get("base_model", "")),
            defaults=dict(body.get("config") or {}),
            choices=choices,
            help=help_,
        )

    def credit(
        self, token: str, scheme: Any, base_model: str | None = None
    ) -> tuple[pd.DataFrame, str]:
        """The credit plot of ``scheme`` on the base model (default: the serving version's),
        and its caption; a scheme or model the API cannot plot gives an empty plot and why."""
        if not scheme:
            return credit_frame({}), "_Choose a credit scheme to see its credit over timesteps._"
        try:
            curve = self.client.credit_curve(token, str(scheme), base_model=base_model or None)
        except ApiError as exc:
            if isinstance(exc, Unauthorized) or exc.status_code not in (404, 422):
                raise
            return credit_frame({}), f"_No credit plot: {escape_markdown(exc.detail)}_"
        return credit_frame(curve), credit_markdown(curve)

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

    def round_view(self, token: str, round_id: str) -> tuple[str, pd.DataFrame]:
        rid = _require_id(round_id, "round")
        return progress_html(self.client.get_round(token, rid)), self.curve(token, rid)

    def version_view(self, token: str, version_id: str) -> tuple[str, list[tuple[str, str]]]:
        """The version's fields, metrics and A/B status, and its validation grid as gallery
        items ``(image path, caption)``: per prompt, the parent's image then the candidate's."""
        vid = _require_id(version_id, "version")
        version = self.client.get_version(token, vid)
        head = (
            f"**Version {version['id']}** · {escape_markdown(str(version.get('name')))} · "
            f"{version.get('status')} · parent {version.get('parent_id') or 'none'} · "
            f"made by round {version.get('created_by_round') or '–'}"
        )
        ab = ab_markdown(self.client.version_ab(token, vid))
        text = f"{head}\n\n{ab}\n\n**Metrics**\n\n{metrics_markdown(version.get('metrics') or {})}"
        try:
            samples = self.client.version_samples(token, vid)
        except NotFound as exc:
            return f"{text}\n\n_No validation grid: {escape_markdown(exc.detail)}._", []
        gallery: list[tuple[str, str]] = []
        for row in samples.get("prompts") or []:
            for side, key in (("parent", "parent_url"), ("candidate", "candidate_url")):
                url = str(row[key])
                ref = ImageRef(image_id=f"sample-{vid}-{url.rsplit('/', 1)[-1]}", url=url)
                path = self.images.get(
                    ref.image_id, functools.partial(self.client.image_bytes, token, ref)
                )
                gallery.append((path, f"{side} · seed {row.get('seed')} · {row.get('prompt')}"))
        return text, gallery

    # -- acting --------------------------------------------------------------------------------

    def start_round(
        self,
        token: str,
        form: RoundForm | None,
        fields: Mapping[str, Any],
        advanced: Sequence[Sequence[Any]],
    ) -> str:
        if form is None:
            raise ValueError("The round form has not loaded yet; press Refresh.")
        overrides = form_overrides(form.defaults, fields, advanced)
        try:
            round_id = self.client.start_round(token, overrides)
        except ApiError as exc:
            if exc.status_code == 422:
                raise FormError(field_errors(exc.detail)) from exc
            raise
        changed = ", ".join(f"{_label(k)} {v}" for k, v in overrides.items()) or "the defaults"
        return f"Round {round_id} queued ({changed})."

    def cancel_round(self, token: str, round_id: str) -> str:
        rid = _require_id(round_id, "round")
        body = self.client.cancel_round(token, rid)
        return f"Round {rid}: {body.get('status', 'cancelling')}."

    def version_action(self, token: str, version_id: str, action: str) -> str:
        vid = _require_id(version_id, "version")
        do = {
            "publish": self.client.publish_version,
            "retire": self.client.retire_version,
            "rollback": self.client.rollback_version,
        }[action]
        body = do(token, vid)
        notes = " ".join(str(n) for n in body.get("notes") or ())
        return f"Version {vid}: {body.get('message') or body.get('status')}. {notes}".strip()

    def set_user_status(self, token: str, user_id: str, status: str) -> str:
        uid = _require_id(user_id, "user")
        if not uid.isdigit():
            raise ValueError("Choose an annotator.")
        user = self.client.update_user(token, int(uid), status=status)
        return f"{user.get('username')} is now {user.get('status')}."

    def create_user(self, token: str, username: str, password: str, role: str) -> str:
        if not (username or "").strip() or not password:
            raise ValueError("Enter a username and a password for the new account.")
        user = self.client.create_user(
            token,
            username.strip(),
            password,
            role="admin" if role == "admin" else "annotator",
        )
        return f"Created {user.get('role')} {user.get('username')} (id {user.get('id')})."

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
        return (
            f"Uploaded {path.name}: {body.get('created', 0)} new prompts, "
            f"{body.get('existing', 0)} already there."
        )

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


def _require_id(value: Any, what: str) -> str:
    value = str(value if value is not None else "").strip()
    if not value:
        raise ValueError(f"Choose a {what} first.")
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", value):
        raise ValueError(f"{value!r} is not a valid {what} id.")
    return value


def _error_text(exc: Exception) -> str:
    if isinstance(exc, Unauthorized):
        return "❌ Your session has expired. Sign out and sign in again."
    if isinstance(exc, ApiError):
        return f"❌ {exc.detail} (HTTP {exc.status_code})"
    return f"❌ {exc}"


def _token(session: AnnotatorSession | None) -> str:
    if session is None or session.signed_out:
        raise ValueError("Sign in first.")
    if not session.is_admin:
        raise ValueError("This tab is for admins.")
    return session.token


def _pick(choices: list[tuple[str, str]], current: Any) -> Any:
    """A dropdown update keeping the selection when it is still there, else the first."""
    values = [v for _, v in choices]
    value = str(current) if current is not None and str(current) in values else None
    return gr.Dropdown(choices=choices, value=value or (values[0] if values else None))


def build_admin_tab(
    actions: AdminActions, session_state: gr.State
) -> tuple[Callable[[AnnotatorSession | None], Any], list[Any]]:
    """Lay out the admin widgets in the current context.

    Returns ``(open, outputs)``: a function that loads every view and the round form for a
    session, and the components it updates (for wiring it to sign-in).
    """
    status = gr.Markdown("", elem_id="prefloop-admin-status")
    with gr.Row():
        refresh_btn = gr.Button("Refresh", variant="secondary", size="sm", scale=0)
        auto_refresh = gr.Checkbox(label=f"Update every {AUTO_REFRESH_S:.0f} s", value=True)
    timer = gr.Timer(AUTO_REFRESH_S, active=False)
    form_state = gr.State(None)

    with gr.Accordion("Dataset", open=True):
        overview_md = gr.Markdown("", elem_id="prefloop-admin-stats")
        activity_plot = gr.LinePlot(
            x="hour",
            y="votes",
            label="Votes per hour (UTC, last 24 hours)",
            height=200,
            elem_id="prefloop-admin-activity",
        )
        with gr.Row():
            export_format = gr.Radio(
                choices=[("Pick-a-Pic parquet", "pickapic"), ("JSON lines", "jsonl")],
                value="pickapic",
                label="Export format",
                scale=1,
            )
            export_btn = gr.Button("Prepare export", scale=0)
            export_file = gr.File(label="Export download", interactive=False, scale=1)

    with gr.Accordion("Start a round", open=True):
        form_info = gr.Markdown("", elem_id="prefloop-round-form-info")
        # The main fields, and beside them the chosen scheme's credit over timesteps.
        with gr.Row(equal_height=False):
            with gr.Column(scale=3, min_width=300, elem_id="prefloop-round-fields"):
                with gr.Row():
                    scheme = gr.Dropdown(
                        label=FORM_FIELDS["scheme"], elem_id="prefloop-field-scheme"
                    )
                    timestep_mode = gr.Dropdown(
                        label=FORM_FIELDS["timestep_mode"], elem_id="prefloop-field-timestep_mode"
                    )
                numbers: dict[str, Any] = {}
                with gr.Row():
                    for key in ("beta", "learning_rate", "steps"):
                        numbers[key] = gr.Number(
                            label=FORM_FIELDS[key],
                            precision=0 if key in INTEGER_FIELDS else None,
                            elem_id=f"prefloop-field-{key}",
                            min_width=120,
                        )
                with gr.Row():
                    for key in ("lora_rank", "holdout_fraction", "batch_size"):
                        numbers[key] = gr.Number(
                            label=FORM_FIELDS[key],
                            precision=0 if key in INTEGER_FIELDS else None,
                            elem_id=f"prefloop-field-{key}",
                            min_width=120,
                        )
            with gr.Column(scale=2, min_width=280, elem_id="prefloop-credit"):
                credit_plot = gr.LinePlot(
                    x="timestep",
                    y="credit",
                    color="series",
                    label="Credit of the chosen scheme over timesteps",
                    show_label=False,  # a label pushes the legend out of the block (Gradio 6.31)
                    x_title="timestep (0 = least noise)",
                    y_title="credit W (mean 1)",
                    x_axis_format="d",
                    y_axis_format="~g",
                    y_lim=[0, None],
                    height=300,
                    elem_id="prefloop-credit-plot",
                )
                credit_info = gr.Markdown("", elem_id="prefloop-credit-info")
        with gr.Accordion("Advanced", open=False):
            advanced_df = gr.Dataframe(
                headers=["field", "value", "about"],
                datatype=["str", "str", "str"],
                interactive=True,
                wrap=True,
                elem_id="prefloop-round-advanced",
                label="Other settings (edit a value; empty keeps the default, null means none)",
            )
        form_errors = gr.Markdown("", elem_id="prefloop-round-errors")
        start_round_btn = gr.Button(
            "Start round", variant="primary", elem_id="prefloop-start-round"
        )
    fields: dict[str, Any] = {"scheme": scheme, "timestep_mode": timestep_mode, **numbers}
    field_list = [fields[k] for k in FORM_FIELDS]

    with gr.Accordion("Training rounds", open=True):
        rounds_df = gr.Dataframe(
            label="Rounds (newest first)",
            interactive=False,
            wrap=False,
            elem_id="prefloop-admin-rounds",
        )
        with gr.Row():
            round_pick = gr.Dropdown(label="Round", elem_id="prefloop-round-pick", scale=2)
            cancel_round_btn = gr.Button("Cancel round…", variant="stop", scale=1)
        with gr.Row(visible=False) as confirm_row:
            gr.Markdown("Cancel this round? Its training stops and no version is made.")
            confirm_cancel_btn = gr.Button(
                "Yes, cancel it", variant="stop", elem_id="prefloop-confirm-cancel"
            )
            keep_btn = gr.Button("Keep it running")
        round_progress = gr.HTML("", elem_id="prefloop-round-progress")
        curve_plot = gr.LinePlot(
            x="step",
            y="value",
            color="series",
            label="Loss, implicit accuracy and held-out curves",
            height=260,
            elem_id="prefloop-round-curve",
        )

    with gr.Accordion("Model versions", open=True):
        versions_df = gr.Dataframe(
            label="Versions", interactive=False, wrap=False, elem_id="prefloop-admin-versions"
        )
        with gr.Row():
            version_pick = gr.Dropdown(label="Version", elem_id="prefloop-version-pick", scale=2)
            publish_btn = gr.Button(
                "Publish", variant="primary", scale=1, elem_id="prefloop-publish"
            )
            retire_btn = gr.Button("Retire", variant="stop", scale=1, elem_id="prefloop-retire")
            rollback_btn = gr.Button("Roll back", scale=1, elem_id="prefloop-rollback")
        version_md = gr.Markdown("", elem_id="prefloop-version-details")
        gallery = gr.Gallery(
            label="Validation grid: each prompt drawn by the parent, then by this version",
            columns=4,
            height=300,
            object_fit="contain",
            allow_preview=True,
            elem_id="prefloop-version-gallery",
            elem_classes=["prefloop-pixelated"],
        )

    with gr.Accordion("Leaderboard", open=False):
        leaderboard_df = gr.Dataframe(
            label="Bradley-Terry scores with 95% bootstrap intervals",
            interactive=False,
            wrap=False,
            elem_id="prefloop-admin-leaderboard",
        )

    with gr.Accordion("Annotators", open=True):
        users_df = gr.Dataframe(
            label="Volume and reliability (gold accuracy, agreement, Krippendorff's α; flagged by "
            "gold accuracy, the outlier test or implausibly fast votes)",
            interactive=False,
            wrap=False,
            elem_id="prefloop-admin-users",
        )
        with gr.Row():
            user_pick = gr.Dropdown(label="Annotator", elem_id="prefloop-user-pick", scale=2)
            ban_btn = gr.Button("Ban", variant="stop", scale=1, elem_id="prefloop-ban")
            shadow_btn = gr.Button("Shadow-ban", scale=1, elem_id="prefloop-shadow-ban")
            unban_btn = gr.Button("Unban", scale=1, elem_id="prefloop-unban")
        with gr.Row():
            new_username = gr.Textbox(label="New username", max_lines=1, scale=2)
            new_password = gr.Textbox(label="Password", type="password", max_lines=1, scale=2)
            new_role = gr.Radio(["annotator", "admin"], value="annotator", label="Role", scale=1)
            create_user_btn = gr.Button("Create account", scale=1)

    with gr.Accordion("Prompts", open=True):
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
        prompt_search = gr.Textbox(label="Search prompts", max_lines=1)
        with gr.Row():
            prompt_pick = gr.Dropdown(label="Prompt", elem_id="prefloop-prompt-pick", scale=3)
            activate_btn = gr.Button("Activate", scale=1, elem_id="prefloop-activate-prompt")
            deactivate_btn = gr.Button(
                "Deactivate", variant="stop", scale=1, elem_id="prefloop-deactivate-prompt"
            )
        prompts_df = gr.Dataframe(
            label="Prompts", interactive=False, wrap=True, elem_id="prefloop-admin-prompts"
        )

    picks = [round_pick, version_pick, user_pick, prompt_pick]
    views = [
        status,
        overview_md,
        activity_plot,
        rounds_df,
        round_pick,
        versions_df,
        version_pick,
        leaderboard_df,
        users_df,
        user_pick,
        prompts_df,
        prompt_pick,
    ]

    def refresh(
        session: AnnotatorSession | None,
        round_sel: Any = None,
        version_sel: Any = None,
        user_sel: Any = None,
        prompt_sel: Any = None,
        search: str = "",
    ) -> Any:
        if session is None or session.signed_out or not session.is_admin:
            return gr.skip()
        token = session.token
        errors: list[str] = []
        updates: dict[Any, Any] = {}

        def load(fill: Callable[[], None]) -> None:
            try:
                fill()
            except (ApiError, ApiUnavailable) as exc:
                errors.append(_error_text(exc))

        def fill_rounds() -> None:
            rounds = actions.rounds(token)
            updates[rounds_df] = table(rounds, ROUND_COLUMNS)
            choices = [(f"round {r['id']} · {r['status']}", str(r["id"])) for r in rounds]
            updates[round_pick] = _pick(choices, round_sel)

        def fill_versions() -> None:
            versions = actions.versions(token)
            updates[versions_df] = table(versions, VERSION_COLUMNS)
            choices = [
                (f"version {v['id']} · {v['name']} · {v['status']}", str(v["id"])) for v in versions
            ]
            updates[version_pick] = _pick(choices, version_sel)

        def fill_users() -> None:
            users = actions.users(token)
            updates[users_df] = table(users, USER_COLUMNS)
            choices = [
                (f"{u['username']} · {u['status']}", str(u["id"]))
                for u in users
                if u.get("role") != "admin"
            ]
            updates[user_pick] = _pick(choices, user_sel)

        def fill_overview() -> None:
            updates[overview_md], updates[activity_plot] = actions.overview(token)

        load(fill_overview)
        load(fill_rounds)
        load(fill_versions)
        load(lambda: updates.__setitem__(leaderboard_df, actions.leaderboard(token)))
        load(fill_users)

        def fill_prompts() -> None:
            prompts = actions.prompts(token, search)
            updates[prompts_df] = table(prompts, PROMPT_COLUMNS)
            choices = [
                (
                    f"{p['id']} · {'active' if p.get('active') else 'inactive'} · "
                    f"{str(p.get('text', ''))[:60]}",
                    str(p["id"]),
                )
                for p in prompts
            ]
            updates[prompt_pick] = _pick(choices, prompt_sel)

        load(fill_prompts)
        if errors:  # else the status line keeps the last action's message
            updates[status] = " ".join(dict.fromkeys(errors))
        return updates

    def load_form(session: AnnotatorSession | None) -> Any:
        if session is None or session.signed_out or not session.is_admin:
            return gr.skip()
        try:
            form = actions.round_form(session.token)
        except (ApiError, ApiUnavailable) as exc:
            return {form_info: _error_text(exc)}
        updates: dict[Any, Any] = {
            **show_credit(session, form.defaults.get("scheme"), form),
            form_state: form,
            form_info: f"Defaults for **{escape_markdown(form.base_model)}**; change what you "
            "need, the rest keeps its default.",
            advanced_df: {"headers": ["field", "value", "about"], "data": form.advanced_rows()},
            form_errors: "",
        }
        for key, component in fields.items():
            value = form.defaults.get(key)
            info = form.help.get(key, "")[:160]
            if key in CHOICE_FIELDS:
                updates[component] = gr.Dropdown(
                    choices=form.choices.get(key) or [str(value)], value=value, info=info
                )
            else:
                updates[component] = gr.Number(value=value, info=info)
        return updates

    def show_credit(
        session: AnnotatorSession | None, chosen: Any, form: RoundForm | None
    ) -> dict[Any, Any]:
        try:
            frame, text = actions.credit(
                _token(session), chosen, form.base_model if form is not None else None
            )
        except (ApiError, ApiUnavailable, ValueError) as exc:
            return {credit_plot: None, credit_info: _error_text(exc)}
        top = max([1.0, *frame["credit"].tolist()]) * 1.15  # the uniform line below the top
        return {credit_plot: gr.LinePlot(value=frame, y_lim=[0, top]), credit_info: text}

    def on_open(session: AnnotatorSession | None) -> Any:
        updates = refresh(session)
        if not isinstance(updates, dict):
            return updates
        form_updates = load_form(session)
        if isinstance(form_updates, dict):
            updates.update(form_updates)
        for pick, show in ((round_pick, show_round), (version_pick, show_version)):
            selected = getattr(updates.get(pick), "value", None)
            if selected:
                updates.update(show(session, selected))
        return updates

    def run_action(action: Callable[[str], str], session: AnnotatorSession | None, *sel: Any):
        try:
            message = action(_token(session))
        except (ApiError, ApiUnavailable, ValueError, OSError) as exc:
            return {status: _error_text(exc)}
        updates = refresh(session, *sel)
        if not isinstance(updates, dict):
            updates = {}
        updates[status] = f"✅ {message}"
        return updates

    def show_round(session: AnnotatorSession | None, rid: Any) -> dict[Any, Any]:
        if not rid:
            return {round_progress: "", curve_plot: None}
        try:
            progress, curve = actions.round_view(_token(session), str(rid))
        except (ApiError, ApiUnavailable, ValueError) as exc:
            return {status: _error_text(exc)}
        return {round_progress: progress, curve_plot: curve}

    def show_version(session: AnnotatorSession | None, vid: Any) -> dict[Any, Any]:
        if not vid:
            return {version_md: "", gallery: None}
        try:
            text, items = actions.version_view(_token(session), str(vid))
        except (ApiError, ApiUnavailable, ValueError, OSError) as exc:
            return {status: _error_text(exc)}
        return {version_md: text, gallery: items}

    def tick(
        session: AnnotatorSession | None, rsel: Any, vsel: Any, usel: Any, psel: Any, q: str
    ) -> Any:
        updates = refresh(session, rsel, vsel, usel, psel, q)
        if isinstance(updates, dict) and rsel:
            updates.update(show_round(session, rsel))
        return updates

    def on_start(session: AnnotatorSession | None, form: RoundForm | None, *values: Any) -> Any:
        *field_values, advanced, rsel, vsel, usel, psel, q = values
        rows = advanced.values.tolist() if isinstance(advanced, pd.DataFrame) else advanced or []
        given = dict(zip(FORM_FIELDS, field_values, strict=True))
        reset = {
            c: gr.update(info=(form.help.get(k, "")[:160] if form else ""))
            for k, c in fields.items()
        }
        try:
            message = actions.start_round(_token(session), form, given, rows)
        except FormError as exc:
            updates: dict[Any, Any] = {**reset, status: "❌ The round was not started."}
            for key, text in exc.fields.items():
                if key in fields:
                    updates[fields[key]] = gr.update(info=f"❌ {text}")
            updates[form_errors] = "\n".join(
                f"- ❌ **{escape_markdown(FORM_FIELDS.get(k) or _label(k) or 'config')}:** "
                f"{escape_markdown(v)}"
                for k, v in exc.fields.items()
            )
            return updates
        except (ApiError, ApiUnavailable, ValueError) as exc:
            return {status: _error_text(exc)}
        updates = refresh(session, rsel, vsel, usel, psel, q)
        if not isinstance(updates, dict):
            updates = {}
        updates.update(reset)
        updates[status] = f"✅ {message}"
        updates[form_errors] = ""
        return updates

    # The UI's event handlers are not an API (the FastAPI routes are): keep them private.
    private: dict[str, Any] = {"api_visibility": "private"}
    sel_inputs = [session_state, *picks, prompt_search]
    refresh_btn.click(refresh, inputs=sel_inputs, outputs=views, **private)
    prompt_search.submit(refresh, inputs=sel_inputs, outputs=views, **private)
    timer.tick(
        tick,
        inputs=sel_inputs,
        outputs=[*views, round_progress, curve_plot],
        show_progress="hidden",
        **private,
    )
    auto_refresh.change(
        lambda on: gr.Timer(active=bool(on)), inputs=[auto_refresh], outputs=[timer], **private
    )
    round_pick.input(
        show_round,
        inputs=[session_state, round_pick],
        outputs=[round_progress, curve_plot, status],
        **private,
    )
    version_pick.input(
        show_version,
        inputs=[session_state, version_pick],
        outputs=[version_md, gallery, status],
        **private,
    )
    start_round_btn.click(
        on_start,
        inputs=[session_state, form_state, *field_list, advanced_df, *picks, prompt_search],
        outputs=[*views, *field_list, form_errors],
        **private,
    )
    scheme.input(
        show_credit,
        inputs=[session_state, scheme, form_state],
        outputs=[credit_plot, credit_info],
        **private,
    )
    cancel_round_btn.click(lambda: gr.Row(visible=True), outputs=[confirm_row], **private)
    keep_btn.click(lambda: gr.Row(visible=False), outputs=[confirm_row], **private)

    def on_cancel(session: AnnotatorSession | None, rsel: Any, *rest: Any) -> Any:
        updates = run_action(lambda t: actions.cancel_round(t, rsel), session, rsel, *rest)
        updates[confirm_row] = gr.Row(visible=False)
        updates.update(show_round(session, rsel))
        return updates

    confirm_cancel_btn.click(
        on_cancel,
        inputs=[session_state, *picks],
        outputs=[*views, confirm_row, round_progress, curve_plot],
        **private,
    )
    for button, action in (
        (publish_btn, "publish"),
        (retire_btn, "retire"),
        (rollback_btn, "rollback"),
    ):
        button.click(
            lambda s, *sel, a=action: run_action(
                lambda t: actions.version_action(t, sel[1], a), s, *sel
            ),
            inputs=[session_state, *picks],
            outputs=views,
            **private,
        ).then(
            show_version,
            inputs=[session_state, version_pick],
            outputs=[version_md, gallery, status],
            **private,
        )
    for button, user_status in (
        (ban_btn, "banned"),
        (shadow_btn, "shadow_banned"),  # keeps voting; the votes never train or count
        (unban_btn, "active"),
    ):
        button.click(
            lambda s, *sel, st=user_status: run_action(
                lambda t: actions.set_user_status(t, sel[2], st), s, *sel
            ),
            inputs=[session_state, *picks],
            outputs=views,
            **private,
        )
    create_user_btn.click(
        lambda s, name, pw, role, *sel: run_action(
            lambda t: actions.create_user(t, name, pw, role), s, *sel
        ),
        inputs=[session_state, new_username, new_password, new_role, *picks],
        outputs=views,
        **private,
    ).then(lambda: "", outputs=[new_password], **private)
    upload_btn.click(
        lambda s, f, *sel: run_action(lambda t: actions.upload_prompts(t, f), s, *sel),
        inputs=[session_state, prompt_file, *picks],
        outputs=views,
        **private,
    )

    for button, active in ((activate_btn, True), (deactivate_btn, False)):
        button.click(
            lambda s, *sel, on=active: run_action(
                lambda t: actions.set_prompt_active(t, sel[3], on), s, *sel
            ),
            inputs=[session_state, *picks],
            outputs=views,
            **private,
        )

    def on_export(session: AnnotatorSession | None, fmt: ExportFormat):
        try:
            path, message = actions.export(_token(session), fmt)
        except (ApiError, ApiUnavailable, ValueError, OSError) as exc:
            return {status: _error_text(exc)}
        return {export_file: path, status: f"✅ {message}"}

    export_btn.click(
        on_export,
        inputs=[session_state, export_format],
        outputs=[export_file, status],
        **private,
    )
    open_outputs = [
        *views,
        form_state,
        form_info,
        advanced_df,
        form_errors,
        *field_list,
        credit_plot,
        credit_info,
        round_progress,
        curve_plot,
        version_md,
        gallery,
        timer,
    ]

    def on_open_with_timer(session: AnnotatorSession | None) -> Any:
        updates = on_open(session)
        if isinstance(updates, dict):
            updates[timer] = gr.Timer(active=True)
        return updates

    return on_open_with_timer, open_outputs
