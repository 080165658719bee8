"""The one rule for text that the database stores: what PostgreSQL or SQLite would reject is
refused up front with a 422 that names the field.

Rejected: a NUL character (PostgreSQL's text types cannot hold one), a lone surrogate (not
encodable as UTF-8: psycopg and sqlite3 both fail on it) and a value longer than its column.

Two entry points, one rule (:func:`text_problem`):

- ``Annotated[str, stored_text(max_length=...), NoNul]`` is the type that request schemas use
  (JSON bodies and form fields). Pydantic itself refuses lone surrogates (``string_unicode``);
  :data:`NoNul` adds NUL (``string_nul``), :func:`stored_text` the length and, in the JSON
  Schema, a ``pattern`` without NUL, so generated clients and fuzzers know the rule.
- :func:`check_text` is for parsers outside pydantic (prompt files, dataset imports): it
  returns the same problem as a message, which the caller reports with its line or row.
"""

from __future__ import annotations

from typing import Any

from pydantic import AfterValidator, Field
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

#: The JSON Schema pattern of every stored text: no NUL character.
NO_NUL_PATTERN = "^[^\\x00]*$"


class TextProblem(ValueError):
    """Why a text cannot be stored (``kind`` is the pydantic-style error type)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


def text_problem(value: str, *, max_length: int | None = None) -> TextProblem | None:
    """The reason PostgreSQL or SQLite would reject ``value`` (or a column of
    ``max_length`` characters would not hold it); None when it can be stored."""
    if "\x00" in value:
        return TextProblem("string_nul", "must not contain a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return TextProblem("string_unicode", "must be valid Unicode (no lone surrogates)")
    if max_length is not None and len(value) > max_length:
        return TextProblem("string_too_long", f"must have at most {max_length} characters")
    return None


def check_text(value: str, field: str, *, max_length: int | None = None) -> str:
    """``value`` when it can be stored, else :class:`TextProblem` whose message starts with
    ``field``."""
    problem = text_problem(value, max_length=max_length)
    if problem is not None:
        raise TextProblem(problem.kind, f"{field}: {problem.message}")
    return value


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise PydanticCustomError("string_nul", "String must not contain a NUL character")
    return value


#: The validator of every stored text: a NUL character is a 422 (``string_nul``).
NoNul = AfterValidator(_no_nul)


def stored_text(*, max_length: int, min_length: int = 0, **field: Any) -> FieldInfo:
    """The field of a stored text, limited to ``max_length`` characters (its column's size);
    use it with :data:`NoNul`: ``Annotated[str, stored_text(max_length=64), NoNul]``. Extra
    keyword arguments go to :func:`pydantic.Field`."""
    if "pattern" not in field:
        field["json_schema_extra"] = {"pattern": NO_NUL_PATTERN}
    field_info: FieldInfo = Field(min_length=min_length, max_length=max_length, **field)
    return field_info
