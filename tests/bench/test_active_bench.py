"""bench.active: its arms, intervals and table against hand-computed values, and a smoke run of
the real benchmark at the smallest size."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench import active as ba

REPO = Path(__file__).resolve().parents[2]


def test_arms_pick_per_pool_batch_by_hand():
    # 5 votes, 2 candidates, batches of 3: batch 1 = candidates 0..5 (3 votes), batch 2 =
    # candidates 6..9 (2 votes)
    d = [0.1, 0.9, 0.2, 0.8, 0.3, 0.05, 0.4, 0.1, 0.7, 0.6]
    uniform, active = ba.arms(d, votes=5, candidates=2, batch=3)
    assert uniform == [0, 1, 2, 6, 7]  # the first n of each batch
    assert active == [1, 3, 4, 8, 9]  # the n most different of each batch
    with pytest.raises(ValueError, match="distances"):
        ba.arms(d[:-1], votes=5, candidates=2, batch=3)


def test_seed_interval_by_hand():
    mean, lo, hi = ba.seed_interval([0.01, 0.03, 0.02])
    # sd = 0.01, 3 seeds: half width = t(2) * 0.01 / sqrt(3) = 4.303 * 0.005774 = 0.02484
    assert mean == pytest.approx(0.02)
    assert (
        hi - mean == pytest.approx(4.303 * 0.01 / math.sqrt(3)) == pytest.approx(0.024844, abs=1e-6)
    )
    assert mean - lo == pytest.approx(hi - mean)
    m1, lo1, hi1 = ba.seed_interval([0.5])
    assert m1 == 0.5 and math.isnan(lo1) and math.isnan(hi1)
    assert ba.t975(2) == 4.303 and ba.t975(30) == 2.042 and ba.t975(200) == 1.96


def _arm(gain, lo, hi, dist):
    return {
        "taste_gain": gain,
        "taste_lo": lo,
        "taste_hi": hi,
        "win_rate": 0.6,
        "judge_delta": -0.01,
        "ties": 2,
        "distance": dist,
    }


def test_table_puts_the_arms_side_by_side_with_the_difference():
    rows = [
        {"seed": s, "uniform": _arm(u, u - 0.01, u + 0.01, 0.1), "active": _arm(a, 0, 1, 0.2)}
        for s, u, a in ((0, 0.010, 0.020), (1, 0.012, 0.018), (2, 0.008, 0.022))
    ]
    table = ba.format_table(rows, "brightness")
    lines = table.splitlines()
    assert "uniform" in lines[1] and "active" in lines[1]
    assert lines[4].startswith("   0 |") and lines[4].endswith("+0.0100")  # 0.020 - 0.010
    assert lines[5].endswith("+0.0060") and lines[6].endswith("+0.0140")
    # differences 0.010, 0.006, 0.014: mean 0.010, sd 0.004, half width 4.303*0.004/sqrt(3)
    half = 4.303 * 0.004 / math.sqrt(3)
    assert f"active − uniform +0.0100 [{0.01 - half:+.4f}, {0.01 + half:+.4f}]" in table
    assert "verdict: active choice gains taste (interval above 0)" in table
    one = ba.format_table(rows[:1], "brightness")
    assert "verdict: one seed: no interval, no verdict" in one


@pytest.mark.slow
def test_the_benchmark_runs_end_to_end_at_the_smallest_size(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "bench.active",
        "--seeds",
        "1",
        "--votes",
        "8",
        "--units",
        "4",
        "--candidates",
        "2",
        "--set",
        "steps=2",
        "--set",
        "fidelity_units=4",
        "--set",
        "eval_every=1",
        "--out",
        str(tmp_path),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    lines = proc.stdout.splitlines()
    row = next(line for line in lines if line.startswith("   0 |"))
    assert len(re.findall(r"[+-]\d\.\d{4} \[[+-]\d\.\d{4}, [+-]\d\.\d{4}\]", row)) == 2
    assert "verdict: one seed: no interval, no verdict" in proc.stdout
    (result,) = tmp_path.glob("active-brightness-*.json")
    data = json.loads(result.read_text())
    assert data["candidates"] == 2 and len(data["rows"]) == 1
    r = data["rows"][0]
    assert r["uniform"]["votes"] == r["active"]["votes"] == 8
    # the active arm votes on the more different pairs of the same candidates
    assert r["active"]["distance"] >= r["uniform"]["distance"]
    diff = r["active"]["taste_gain"] - r["uniform"]["taste_gain"]
    assert row.endswith(f"{diff:+.4f}")
