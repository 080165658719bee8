"""Smoke test of ``python -m bench.storage``: the smallest run (moto's S3 server and three API
servers as real processes) prints every row of the latency table with finite figures, and the
JSON holds the same rows."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODES = [
    "local",
    "s3 proxy, cold",
    "s3 proxy, warm",
    "s3 redirect (307 + presigned GET)",
]


@pytest.mark.slow
def test_storage_bench_prints_every_row(tmp_path: Path) -> None:
    out = tmp_path / "storage.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.storage", "--requests", "12", "--images", "4"]
        + ["--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    for size in ("32 px", "512 px"):
        for mode in MODES:
            assert any(
                size in line and line.rstrip().split("|")[1].strip() == mode
                for line in lines
                if line.count("|") == 4
            ), (size, mode, proc.stdout)
    rows = json.loads(out.read_text())["rows"]
    assert sorted((r["size"].split(" (")[0], r["mode"]) for r in rows) == sorted(
        (s, m) for s in ("32 px", "512 px") for m in MODES
    )
    assert all(math.isfinite(r["p50_ms"]) and 0 < r["p50_ms"] <= r["p95_ms"] for r in rows)
    assert "redirect parts" in proc.stdout
