"""Prompt sets: parsing uploaded files and adding prompts, all or nothing.

Accepted files (chosen by extension, else by content type):

- ``.txt``: one prompt per line; blank lines are skipped.
- ``.csv``: a header row with a ``text`` (or ``prompt`` / ``caption``) column, optional
  ``source`` column; or a single column with no header, one prompt per row.
- ``.jsonl``: one JSON string, or object with ``text`` / ``prompt`` / ``caption`` (and
  optional ``source``), per line; blank lines are skipped.

Any bad line rejects the whole file with :class:`PromptFileError` naming the line, and
nothing is written.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from backend.models import Prompt
from backend.services.common import dialect_insert
from backend.services.errors import Invalid, NotFound
from backend.text_input import TextProblem, check_text

MAX_PROMPT_CHARS = 2000
MAX_SOURCE_CHARS = 128
TEXT_KEYS = ("text", "prompt", "caption")


class PromptFileError(Invalid):
    def __init__(self, line: int | None, message: str) -> None:
        super().__init__(f"line {line}: {message}" if line is not None else message)
        self.line = line


@dataclass(frozen=True)
class PromptIn:
    text: str
    source: str | None = None


def _clean(text: object, line: int | None) -> str:
    if not isinstance(text, str):
        raise PromptFileError(line, "prompt text must be a string")
    text = " ".join(text.split())
    if not text:
        raise PromptFileError(line, "empty prompt")
    try:
        return check_text(text, "text", max_length=MAX_PROMPT_CHARS)
    except TextProblem as exc:
        raise PromptFileError(line, str(exc)) from None


def _source(value: object, line: int | None, default: str | None) -> str | None:
    if value is None or value == "":
        return default
    if not isinstance(value, str):
        raise PromptFileError(line, "source must be a string")
    try:
        return check_text(value, "source", max_length=MAX_SOURCE_CHARS)
    except TextProblem as exc:
        raise PromptFileError(line, str(exc)) from None


def check_default_source(value: str | None, field: str) -> str | None:
    """A request-wide ``source`` (a form field, or the uploaded file's name): 422 naming
    ``field`` when it cannot be stored."""
    if value is None or value == "":
        return None
    try:
        return check_text(value, field, max_length=MAX_SOURCE_CHARS)
    except TextProblem as exc:
        raise PromptFileError(None, str(exc)) from None


def detect_format(filename: str | None, content_type: str | None) -> str:
    name = (filename or "").lower()
    for ext, fmt in ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".csv", "csv"), (".txt", "txt")):
        if name.endswith(ext):
            return fmt
    ct = (content_type or "").split(";")[0].strip().lower()
    if ct in ("text/csv", "application/csv"):
        return "csv"
    if ct in ("application/jsonl", "application/x-ndjson", "application/jsonlines"):
        return "jsonl"
    if ct == "text/plain":
        return "txt"
    raise PromptFileError(None, "unknown file type: use a .txt, .csv or .jsonl file")


def parse_prompt_file(data: bytes, fmt: str, *, source: str | None = None) -> list[PromptIn]:
    """Parse a whole prompt file, or raise :class:`PromptFileError` with the line number."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise PromptFileError(line, "not valid UTF-8") from None
    if fmt == "txt":
        out = [
            PromptIn(_clean(raw, n), source)
            for n, raw in enumerate(text.splitlines(), 1)
            if raw.strip()
        ]
    elif fmt == "jsonl":
        out = []
        for n, raw in enumerate(text.splitlines(), 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise PromptFileError(n, f"invalid JSON ({exc.msg})") from None
            if isinstance(obj, dict):
                key = next((k for k in TEXT_KEYS if k in obj), None)
                if key is None:
                    raise PromptFileError(n, "object has no 'text' field")
                out.append(PromptIn(_clean(obj[key], n), _source(obj.get("source"), n, source)))
            else:
                out.append(PromptIn(_clean(obj, n), source))
    elif fmt == "csv":
        out = _parse_csv(text, source)
    else:
        raise PromptFileError(None, f"unknown format {fmt!r}")
    if not out:
        raise PromptFileError(None, "the file holds no prompt")
    return out


def _parse_csv(text: str, source: str | None) -> list[PromptIn]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    out: list[PromptIn] = []
    try:
        rows = list(reader)
    except csv.Error as exc:
        raise PromptFileError(reader.line_num, f"malformed CSV ({exc})") from None
    if not rows:
        return out
    header = [h.strip().lower() for h in rows[0]]
    text_col = next((header.index(k) for k in TEXT_KEYS if k in header), None)
    source_col = header.index("source") if "source" in header else None
    if text_col is None:
        if len(header) != 1:
            raise PromptFileError(1, "CSV needs a 'text' column (or exactly one column)")
        body, first_line, text_col = rows, 1, 0
    else:
        body, first_line = rows[1:], 2
    width = len(rows[0])
    for n, row in enumerate(body, first_line):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != width:
            raise PromptFileError(n, f"expected {width} columns, found {len(row)}")
        src = _source(row[source_col], n, source) if source_col is not None else source
        out.append(PromptIn(_clean(row[text_col], n), src))
    return out


def validate_prompts(items: Iterable[PromptIn]) -> list[PromptIn]:
    return [PromptIn(_clean(p.text, None), _source(p.source, None, None)) for p in items]


@dataclass(frozen=True)
class AddResult:
    created: int
    existing: int


def add_prompts(session: Session, items: list[PromptIn]) -> AddResult:
    """Insert new prompts, skipping texts already present (duplicates in the batch too)."""
    unique: dict[str, PromptIn] = {}
    for p in items:
        unique.setdefault(p.text, p)
    created = 0
    table = Prompt.__table__
    texts = list(unique)
    for start in range(0, len(texts), 500):
        chunk = [unique[t] for t in texts[start : start + 500]]
        stmt = (
            dialect_insert(session, table)
            .values([{"text": p.text, "source": p.source, "active": True} for p in chunk])
            .on_conflict_do_nothing()
            .returning(table.c.id)
        )
        created += len(session.execute(stmt).all())
    return AddResult(created=created, existing=len(items) - created)


def list_prompts(
    session: Session, *, offset: int, limit: int, active: bool | None = None
) -> tuple[list[Prompt], int]:
    q = select(Prompt)
    c = select(func.count()).select_from(Prompt)
    if active is not None:
        q = q.where(Prompt.active.is_(active))
        c = c.where(Prompt.active.is_(active))
    rows = list(session.scalars(q.order_by(Prompt.id).offset(offset).limit(limit)))
    return rows, session.scalar(c) or 0


def set_active(session: Session, prompt_id: int, active: bool) -> Prompt:
    """Activate or deactivate a prompt (new images are drawn for active prompts only; pairs
    already made keep being served). NotFound for an unknown id."""
    prompt = session.get(Prompt, prompt_id)
    if prompt is None:
        raise NotFound(f"prompt {prompt_id} not found")
    prompt.active = active
    return prompt
