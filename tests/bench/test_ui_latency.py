"""``python -m bench.ui_latency``: the smallest run (3 keyboard votes in headless Chromium
against a real ``prefloop serve``) prints the table, and every stored vote is for the pair that
was on screen (the page swaps in the preloaded pair before the server answers); the report's
figures are the percentiles of what was measured."""

from __future__ import annotations

import os
import re

import pytest

from bench import ui_latency


def test_the_report_gives_the_percentiles_of_the_votes() -> None:
    votes = [ui_latency.Vote(swap_ms=float(i), shown_ms=float(i) + 10) for i in range(1, 101)]
    text = ui_latency.report(votes, 500)
    # numpy's linear percentiles of 1..100: p50 = 50.5, p95 = 95.05 (printed rounded)
    assert re.search(r"key -> next pair's URLs \(swap\) +50ms +95ms +100ms", text), text
    assert re.search(r"key -> images decoded \(shown\) +60ms +105ms +110ms", text), text
    assert "p95 shown 105 ms meets the goal of 150 ms" in text


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.skipif(
    not os.path.exists(ui_latency.CHROMIUM) and not os.environ.get("CI"),
    reason=f"needs Chromium at {ui_latency.CHROMIUM}",
)
def test_three_keyboard_votes_are_timed(capsys) -> None:  # type: ignore[no-untyped-def]
    assert ui_latency.main(["--votes", "3", "--think-ms", "200"]) == 0
    out = capsys.readouterr().out
    assert "3 keyboard votes, 200 ms look at each pair, 32x32 PNGs" in out
    # the pair shown at once on the click is the one the next vote is stored for
    assert "every vote went to the pair on screen" in out
    row = re.search(r"key -> images decoded \(shown\) +(\d+)ms +(\d+)ms +(\d+)ms", out)
    assert row is not None, out
    p50, p95, worst = map(int, row.groups())
    assert 0 < p50 <= p95 <= worst < 15000
