"""A real Celery worker is SIGKILLed at three points of a round (during training, during
evaluation, between writing the adapter and the transaction that publishes the version), a
new worker is started and the sweeper re-queues the round: it finishes exactly once, with no
half-published version and no orphaned file. The scenario lives in ``bench/worker_kill.py``
(which also runs it x20 at random points); each run here takes a few tens of seconds."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from bench.worker_kill import POINTS, run_scenario

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("point", POINTS)
def test_worker_killed_mid_round_finishes_the_round_exactly_once(
    point: str, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    out = run_scenario(point, tiny_checkpoint, tmp_path, rng=random.Random(0))
    assert out.killed, out
    expected = {"training": "running", "evaluation": "evaluating", "after_artifact": "evaluating"}
    assert out.state_at_kill == expected[point], out
    assert out.versions_at_kill == 0, out  # killed before the version existed
    # the kill between the two writes: the file is there, the row is not (yet)
    assert out.artifact_at_kill == (point == "after_artifact"), out
    assert out.ok, "\n".join(out.notes)
