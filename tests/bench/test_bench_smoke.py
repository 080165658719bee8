"""Smoke test of ``python -m bench.train_step``: the smallest run prints the whole table.

It runs the real benchmark (fork server, one process per configuration, the real trainer) with
2 timed steps of 2 pairs, and checks that every (model, finetune, scheme, mode) row is there with
finite figures, that the verdict line is printed, and that the JSON holds the same rows. On a
machine without CUDA it also passes ``--gpu-sd15`` and checks that the GPU part says it was
skipped. About 20 s on an idle 2-core machine.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

EXPECTED_ROWS = [
    (model, finetune, scheme, mode)
    for model, finetune in (
        ("builtin:shapes", "lora"),
        ("builtin:shapes", "full"),
        ("tiny-sd", "lora"),
    )
    for scheme, mode in (
        ("dde", "importance"),
        ("uniform (DPO)", "importance"),
        ("dde", "weighted"),
    )
]
HEADER = [
    "model",
    "finetune",
    "scheme",
    "mode",
    "s/step",
    "pairs/s",
    "peak MB",
    "DDE/DPO cost ratio",
    "cpu s/step",
    "cpu ratio",
]


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return bool(torch.cuda.is_available())


def _number(cell: str) -> float:
    return float(cell.split()[0])


@pytest.mark.slow
def test_train_step_quick_prints_every_row(tmp_path: Path) -> None:
    out_json = tmp_path / "train_step.json"
    cmd = [
        sys.executable,
        "-m",
        "bench.train_step",
        "--quick",
        "--steps",
        "1",
        "--warmup",
        "1",
        "--batch-size",
        "2",
        "--pairs",
        "2",
        "--out",
        str(out_json),
    ]
    no_gpu = not _cuda_available()
    if no_gpu:
        cmd.append("--gpu-sd15")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    lines = proc.stdout.splitlines()

    header_idx = next(
        i
        for i, line in enumerate(lines)
        if line.startswith("model ") and "DDE/DPO cost ratio" in line
    )
    assert [c.strip() for c in lines[header_idx].split("|")] == HEADER
    assert set(lines[header_idx + 1]) <= {"-", "|"}
    rows = []
    for line in lines[header_idx + 2 :]:
        if "|" not in line:
            break
        rows.append([c.strip() for c in line.split("|")])
    assert [tuple(r[:4]) for r in rows] == EXPECTED_ROWS

    for r in rows:
        s_step, pairs_s, peak, ratio, cpu_step, cpu_ratio = (_number(c) for c in r[4:])
        for value in (s_step, pairs_s, peak, ratio, cpu_step, cpu_ratio):
            assert math.isfinite(value), r
        assert s_step > 0 and pairs_s > 0 and cpu_step > 0 and peak > 50, r
        assert pairs_s == pytest.approx(2 / s_step, rel=0.02), r
        if r[2].startswith("uniform"):
            assert r[7] == "1.00 (base)" and r[9] == "1.00 (base)"

    verdict = [line for line in lines if line.startswith("Verdict: ")]
    assert len(verdict) == 1
    assert re.search(r"per pair: (YES|NO)\.", verdict[0])
    assert "Tolerance: ratio <= 1.10 (10%)" in verdict[0]
    if no_gpu:
        assert any("GPU SD1.5 part skipped: no CUDA GPU" in line for line in lines)

    data = json.loads(out_json.read_text())
    assert len(data["rows"]) == len(EXPECTED_ROWS)
    for row in data["rows"]:
        assert row["timed_steps"] == 1
        for key in ("s_per_step", "pairs_per_s", "peak_mb", "ratio", "cpu_s_per_step", "cpu_ratio"):
            assert isinstance(row[key], float) and math.isfinite(row[key]), (key, row[key])
    assert data["verdict"]["answer"] in ("YES", "NO")
    if no_gpu:
        assert data["gpu_sd15"] == {"skipped": True, "reason": "no CUDA device"}


@pytest.mark.slow
def test_train_step_cache_only_prints_before_and_after(tmp_path: Path) -> None:
    """``--cache-only``: tiny SD with the encode cache off and on, in one table."""
    out_json = tmp_path / "train_step.json"
    cmd = [
        sys.executable,
        "-m",
        "bench.train_step",
        "--cache-only",
        "--quick",
        "--steps",
        "1",
        "--warmup",
        "1",
        "--batch-size",
        "2",
        "--pairs",
        "2",
        "--out",
        str(out_json),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    assert "DDE/DPO cost ratio" not in proc.stdout  # the main table is skipped
    lines = proc.stdout.splitlines()
    header_idx = next(i for i, line in enumerate(lines) if "encode cache" in line and "|" in line)
    rows = [[c.strip() for c in line.split("|")] for line in lines[header_idx + 2 :] if "|" in line]
    assert [r[:5] for r in rows] == [
        ["tiny-sd", "lora", "dde", "importance", "off (before)"],
        ["tiny-sd", "lora", "dde", "importance", "on (after)"],
    ]
    assert rows[0][7] == "1.00 (before)" and math.isfinite(_number(rows[1][7]))
    data = json.loads(out_json.read_text())
    assert [r["encode_cache"] for r in data["encode_cache_rows"]] == [False, True]
    assert "rows" not in data
