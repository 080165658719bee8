"""The operator CLI's text output and ``--set`` parsing, on hand-written values."""

from __future__ import annotations

import pytest

from prefloop_client.cli import CliError, fields, parse_sets, table


def test_table_aligns_columns_and_writes_none_as_a_dash() -> None:
    rows = [
        {"id": 3, "status": "queued", "acc": None},
        {"id": 12, "status": "succeeded", "acc": 0.612345},
    ]
    assert table(rows, [("id", "id"), ("status", "status"), ("acc", "held-out")]) == (
        "id  status     held-out\n3   queued     -\n12  succeeded  0.6123"
    )
    assert table([], [("id", "id")]) == "(none)"


def test_fields_indent_nested_values() -> None:
    assert fields({"id": 3, "config": {"beta": 500.0, "scheme": "dde"}, "ok": True}) == (
        "id      3\nconfig:\n  beta    500\n  scheme  dde\nok      yes"
    )


def test_set_values_are_json_when_they_parse_else_text() -> None:
    assert parse_sets(["steps=7", "beta=2.5e3", "scheme=uniform", "drift_budget=null"]) == {
        "steps": 7,
        "beta": 2500.0,
        "scheme": "uniform",
        "drift_budget": None,
    }
    with pytest.raises(CliError, match="write it as key=value"):
        parse_sets(["=3"])
