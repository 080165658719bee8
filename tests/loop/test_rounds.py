"""worker.rounds.run_round and worker.round_schedule (sweep, maybe_schedule_round), called
directly on real rows.

Each test uses a fresh SQLite database at ``alembic upgrade head``, a pool made by the real
``refill_pool`` from a tiny built-in model, and votes written as the API writes them. Training
is the real trainer (a few LoRA steps on CPU) and the evaluation the real judge.
"""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy import func, select, update

from backend.models import (
    Choice,
    ModelVersion,
    RoundMetric,
    RoundStatus,
    TrainingRound,
    VersionStatus,
    Vote,
)
from backend.services import rounds as round_service
from worker import model_registry, pair_pool, round_schedule, round_state, rounds


def _round(db: Any, round_id: int) -> TrainingRound:
    with db.read_session() as s:
        return s.get(TrainingRound, round_id)


def _status(db: Any, round_id: int) -> RoundStatus:
    return RoundStatus(_round(db, round_id).status)


def _row_state(db: Any, round_id: int) -> dict[str, Any]:
    """Everything a second delivery must not change."""
    with db.read_session() as s:
        rnd = s.get(TrainingRound, round_id)
        columns = {a.key: getattr(rnd, a.key) for a in TrainingRound.__mapper__.column_attrs}
        return {
            "round": columns,
            "versions": s.scalar(select(func.count()).select_from(ModelVersion)),
            "metric_rows": s.scalar(
                select(func.count())
                .select_from(RoundMetric)
                .where(RoundMetric.round_id == round_id)
            ),
        }


def _versions_of(db: Any, round_id: int) -> list[ModelVersion]:
    with db.read_session() as s:
        return list(
            s.scalars(select(ModelVersion).where(ModelVersion.created_by_round == round_id))
        )


@pytest.fixture
def voted_env(make_env: Any, loop: Any) -> Any:
    """A database with a full pool and one vote on every within-version pair, cycling through
    left, right, tie, both_bad and skip."""

    def make(**settings_overrides: Any) -> tuple[Any, Any, int]:
        settings, db = make_env(**settings_overrides)
        assert pair_pool.refill_pool(db.write_session, settings, seed=0) > 0
        user = loop.add_annotator(db)
        loop.vote_on_within_pairs(
            db, user, choices=[Choice.left, Choice.right, Choice.tie, Choice.both_bad, Choice.skip]
        )
        return settings, db, user

    return make


def test_round_goes_queued_running_evaluating_succeeded(
    voted_env: Any, loop: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, db, _ = voted_env()
    round_id = loop.create_round(db)
    assert _status(db, round_id) == RoundStatus.queued

    seen: list[str] = []
    flush = rounds._ProgressWriter.flush
    evaluate = rounds.evaluate_against_parent

    def spy_flush(self: Any) -> None:
        seen.append(f"train:{_status(db, round_id).value}")
        flush(self)

    def spy_evaluate(backbone: Any, n: int) -> dict[str, Any]:
        seen.append(f"eval:{_status(db, round_id).value}")
        return evaluate(backbone, n)

    monkeypatch.setattr(rounds._ProgressWriter, "flush", spy_flush)
    monkeypatch.setattr(rounds, "evaluate_against_parent", spy_evaluate)

    rounds.run_round(round_id, db.write_session, settings, task_id="task-1")

    assert seen and all(s == "train:running" for s in seen[:-1]), seen
    assert seen[-1] == "eval:evaluating"
    rnd = _round(db, round_id)
    assert RoundStatus(rnd.status) == RoundStatus.succeeded, rnd.error
    assert rnd.error is None and rnd.attempts == 1 and rnd.celery_task_id == "task-1"
    assert rnd.step == loop.TINY_ROUND["steps"] and rnd.progress == 1.0
    assert rnd.finished_at is not None

    # The snapshot: left and right votes only (ties, both-bad and skip dropped by default).
    with db.read_session() as s:
        decisive = s.scalar(
            select(func.count()).select_from(Vote).where(Vote.choice.in_(["left", "right"]))
        )
        rows = s.scalars(
            select(RoundMetric).where(RoundMetric.round_id == round_id).order_by(RoundMetric.step)
        ).all()
    assert rnd.metrics["pairs"] == decisive > 0
    assert [r.step for r in rows] == list(range(1, loop.TINY_ROUND["steps"] + 1))
    assert all(r.loss is not None and r.loss > 0 for r in rows)
    assert "timestep_histogram" in rows[0].extra

    # The judge's evaluation against the parent, on held-out prompts.
    m = rnd.metrics
    assert m["eval_prompts"] == loop.TINY_ROUND["eval_prompts"]
    for key in ("judge_parent", "judge_new", "judge_delta", "judge_delta_sem"):
        assert isinstance(m[key], float)
    assert m["judge_delta"] == pytest.approx(m["judge_new"] - m["judge_parent"], abs=2e-5)

    # A candidate version with its adapter file, whose sha256 matches the row.
    (version,) = _versions_of(db, round_id)
    assert rnd.version_id == version.id
    assert VersionStatus(version.status) == VersionStatus.candidate
    assert version.parent_id == rnd.parent_version_id is not None
    # Under a prefix unique to the publishing attempt (worker/rounds.py), nothing else left.
    assert re.fullmatch(
        rf"versions/round-{round_id}/a1-[0-9a-f]{{12}}/adapter\.safetensors", version.adapter_path
    ), version.adapter_path
    adapter = settings.models_dir / version.adapter_path
    assert [p.name for p in adapter.parent.parent.iterdir()] == [adapter.parent.name]
    assert hashlib.sha256(adapter.read_bytes()).hexdigest() == version.adapter_sha256

    # The validation grid: parent | candidate on fixed prompts and seeds, beside the adapter.
    import json

    samples = adapter.parent / "samples"
    manifest = json.loads((samples / "samples.json").read_text())
    assert m["validation_samples"] == len(manifest["files"]) > 0
    for f in manifest["files"]:
        assert (samples / f["parent"]).is_file() and (samples / f["candidate"]).is_file()
    assert (samples / "grid.png").is_file()
    assert version.metrics["judge_new"] == m["judge_new"]
    assert not rounds.work_dir(settings, round_id).exists()

    # The version loads (base + verified adapter) and is not its parent.
    with db.read_session() as s:
        new = model_registry.load_version(s, version.id, models_dir=settings.models_dir)
        parent = model_registry.load_version(s, version.parent_id, models_dir=settings.models_dir)
    cond = parent.encode_prompts(["a small red circle on a blue background, top left"])
    x, t = (
        torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
        torch.tensor([500]),
    )
    with torch.no_grad():
        assert not torch.allclose(new.predict_noise(x, t, cond), parent.predict_noise(x, t, cond))

    # A second delivery of the same task (and another task) changes nothing.
    before = _row_state(db, round_id)
    mtime = adapter.stat().st_mtime_ns
    rounds.run_round(round_id, db.write_session, settings, task_id="task-1")
    rounds.run_round(round_id, db.write_session, settings, task_id="task-2")
    assert _row_state(db, round_id) == before
    assert adapter.stat().st_mtime_ns == mtime


def test_cancelled_round_stops_without_a_version(
    voted_env: Any, loop: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, db, _ = voted_env()
    round_id = loop.create_round(db, steps=40)
    monkeypatch.setattr(round_state, "STOP_CHECK_EVERY_S", 0.0)
    call = rounds._ProgressWriter.__call__

    def cancel_at_step_3(self: Any, m: Any) -> None:
        call(self, m)
        if m.step == 3:  # what POST /rounds/{id}/cancel does, from another connection
            with db.transaction() as s:
                round_service.cancel_round(s, round_id)

    monkeypatch.setattr(rounds._ProgressWriter, "__call__", cancel_at_step_3)
    rounds.run_round(round_id, db.write_session, settings, task_id="t")

    rnd = _round(db, round_id)
    assert RoundStatus(rnd.status) == RoundStatus.cancelled
    assert rnd.step == 3 and rnd.version_id is None and rnd.error is None
    assert _versions_of(db, round_id) == []
    assert not (settings.models_dir / "versions" / f"round-{round_id}").exists()
    assert not rounds.work_dir(settings, round_id).exists()

    before = _row_state(db, round_id)
    rounds.run_round(round_id, db.write_session, settings, task_id="t")
    assert _row_state(db, round_id) == before


def test_round_cancelled_while_queued_never_starts(voted_env: Any, loop: Any) -> None:
    settings, db, _ = voted_env()
    round_id = loop.create_round(db)
    with db.transaction() as s:
        round_service.cancel_round(s, round_id)
    before = _row_state(db, round_id)
    rounds.run_round(round_id, db.write_session, settings)
    assert _row_state(db, round_id) == before
    assert before["round"]["attempts"] == 0


def test_diverging_round_fails_with_the_reason_and_no_version(voted_env: Any, loop: Any) -> None:
    settings, db, _ = voted_env()
    # A full fine-tune at learning rate 1 with an enormous beta: the loss turns NaN in a few steps.
    round_id = loop.create_round(
        db, steps=30, learning_rate=1.0, beta=1e6, max_grad_norm=1e4, full_finetune=True
    )
    rounds.run_round(round_id, db.write_session, settings)

    rnd = _round(db, round_id)
    assert RoundStatus(rnd.status) == RoundStatus.failed
    assert rnd.error.startswith("training diverged at step ")
    assert "non-finite" in rnd.error
    assert rnd.version_id is None and _versions_of(db, round_id) == []
    version_dir = settings.models_dir / "versions" / f"round-{round_id}"
    assert not (version_dir / "adapter.safetensors").exists()
    assert not (version_dir / "unet.safetensors").exists()
    assert not rounds.work_dir(settings, round_id).exists()

    before = _row_state(db, round_id)
    rounds.run_round(round_id, db.write_session, settings)
    assert _row_state(db, round_id) == before


def test_a_round_on_few_pairs_trains_at_most_max_epochs(voted_env: Any, loop: Any) -> None:
    settings, db, _ = voted_env()
    round_id = loop.create_round(db, steps=200, batch_size=2, max_epochs=0.5)
    assert _round(db, round_id).total_steps == 200
    rounds.run_round(round_id, db.write_session, settings, task_id="task-1")
    rnd = _round(db, round_id)
    assert RoundStatus(rnd.status) == RoundStatus.succeeded, rnd.error
    pairs = rnd.metrics["pairs"]
    expected = max(1, pairs // 4)  # half a pass over the pairs at 2 pairs per step
    assert expected < 200
    assert rnd.total_steps == rnd.step == rnd.metrics["steps"] == expected
    assert rnd.metrics["steps_requested"] == 200
    assert rnd.metrics["epochs"] == pytest.approx(expected * 2 / pairs, abs=1e-3)
    with db.read_session() as s:
        n_rows = s.scalar(
            select(func.count()).select_from(RoundMetric).where(RoundMetric.round_id == round_id)
        )
    assert n_rows == expected


def test_a_majority_round_records_what_its_label_rule_kept(voted_env: Any, loop: Any) -> None:
    """Issue 12: ``label_rule`` and ``exclude_flagged`` reach the worker's snapshot, and the
    round's metrics say how many pairs and votes the rule kept."""
    settings, db, _ = voted_env()
    round_id = loop.create_round(
        db, steps=2, batch_size=2, label_rule="majority", exclude_flagged=True
    )
    rounds.run_round(round_id, db.write_session, settings, task_id="task-1")
    rnd = _round(db, round_id)
    assert RoundStatus(rnd.status) == RoundStatus.succeeded, rnd.error
    labels = rnd.metrics["labels"]
    assert labels["rule"] == "majority"
    assert labels["votes_in"] == rnd.snapshot_vote_count - labels["excluded_votes"]
    assert labels["pairs_kept"] + labels["contested_pairs"] == labels["pairs_in"]
    assert rnd.metrics["votes"] == labels["pairs_kept"]  # one label per kept pair


def test_too_few_pairs_fails_clearly(voted_env: Any, loop: Any) -> None:
    settings, db, _ = voted_env()
    round_id = loop.create_round(db, min_pairs=10_000)
    rounds.run_round(round_id, db.write_session, settings)
    rnd = _round(db, round_id)
    assert RoundStatus(rnd.status) == RoundStatus.failed
    assert "the config asks for at least 10000" in rnd.error
    assert _versions_of(db, round_id) == []


def test_unsupported_config_value_fails_the_round(voted_env: Any, loop: Any) -> None:
    # an older row that still carries a removed setting (the API no longer accepts it)
    settings, db, _ = voted_env()
    round_id = loop.create_round(db)
    with db.transaction() as s:
        rnd = s.get(TrainingRound, round_id)
        rnd.config = {**rnd.config, "label_smoothing": 0.1}
    rounds.run_round(round_id, db.write_session, settings)
    rnd = _round(db, round_id)
    assert RoundStatus(rnd.status) == RoundStatus.failed
    assert "label_smoothing" in rnd.error


class _WorkerKilled(BaseException):
    """Stands for the worker process dying: nothing in run_round catches it."""


def test_round_of_a_dead_worker_is_swept_and_resumed_from_its_checkpoint(
    voted_env: Any, loop: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, db, _ = voted_env()
    round_id = loop.create_round(db, steps=6, checkpoint_every=2)
    call = rounds._ProgressWriter.__call__

    def die_at_step_3(self: Any, m: Any) -> None:
        call(self, m)
        if m.step == 3:
            raise _WorkerKilled

    with monkeypatch.context() as mp:
        mp.setattr(rounds._ProgressWriter, "__call__", die_at_step_3)
        with pytest.raises(_WorkerKilled):
            rounds.run_round(round_id, db.write_session, settings, task_id="dead-worker")

    rnd = _round(db, round_id)
    assert RoundStatus(rnd.status) == RoundStatus.running and rnd.attempts == 1
    assert (rounds.work_dir(settings, round_id) / "checkpoints" / "step-000002").is_dir()

    # Another delivery while the owner's heartbeat is fresh: the owner may be alive; hands off.
    before = _row_state(db, round_id)
    rounds.run_round(round_id, db.write_session, settings, task_id="duplicate")
    assert _row_state(db, round_id) == before

    # The sweeper: nothing is stale yet.
    dispatcher = loop.RecordingDispatcher()
    result = round_schedule.sweep(db.write_session, dispatcher)
    assert result.requeued == [] and dispatcher.sent == []

    # Ten minutes without a heartbeat: re-queued and re-dispatched.
    later = datetime.now(UTC) + timedelta(seconds=round_state.STALE_AFTER_S + 60)
    result = round_schedule.sweep(db.write_session, dispatcher, now=later)
    assert result.requeued == [round_id] and dispatcher.sent == [round_id]
    rnd = _round(db, round_id)
    assert RoundStatus(rnd.status) == RoundStatus.queued
    assert rnd.celery_task_id == f"task-{round_id}-1"

    # The re-sent task resumes from the step-2 checkpoint and finishes.
    rounds.run_round(round_id, db.write_session, settings, task_id=f"task-{round_id}-1")
    rnd = _round(db, round_id)
    assert RoundStatus(rnd.status) == RoundStatus.succeeded, rnd.error
    assert rnd.attempts == 2 and rnd.metrics["resumed_from"] == 2
    with db.read_session() as s:
        steps = s.scalars(
            select(RoundMetric.step)
            .where(RoundMetric.round_id == round_id)
            .order_by(RoundMetric.step)
        ).all()
    assert steps == [1, 2, 3, 4, 5, 6]
    (version,) = _versions_of(db, round_id)
    path = settings.models_dir / version.adapter_path
    assert hashlib.sha256(path.read_bytes()).hexdigest() == version.adapter_sha256


def test_a_redelivered_task_takes_over_its_own_round(
    voted_env: Any, loop: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """acks_late: the same message comes back after its worker died; no need to wait for the
    heartbeat to go stale."""
    settings, db, _ = voted_env()
    round_id = loop.create_round(db, steps=4, checkpoint_every=2)
    call = rounds._ProgressWriter.__call__

    def die_at_step_3(self: Any, m: Any) -> None:
        call(self, m)
        if m.step == 3:
            raise _WorkerKilled

    with monkeypatch.context() as mp:
        mp.setattr(rounds._ProgressWriter, "__call__", die_at_step_3)
        with pytest.raises(_WorkerKilled):
            rounds.run_round(round_id, db.write_session, settings, task_id="same-message")
    rounds.run_round(round_id, db.write_session, settings, task_id="same-message")
    rnd = _round(db, round_id)
    assert RoundStatus(rnd.status) == RoundStatus.succeeded and rnd.attempts == 2
    assert rnd.metrics["resumed_from"] == 2


def test_rounds_give_up_after_max_attempts(voted_env: Any, loop: Any) -> None:
    settings, db, _ = voted_env()
    round_id = loop.create_round(db)
    old = datetime.now(UTC) - timedelta(hours=1)
    with db.transaction() as s:
        s.execute(
            update(TrainingRound)
            .where(TrainingRound.id == round_id)
            .values(
                status=RoundStatus.running,
                attempts=round_state.MAX_ATTEMPTS,
                updated_at=old,
                celery_task_id="gone",
            )
        )
    dispatcher = loop.RecordingDispatcher()
    result = round_schedule.sweep(db.write_session, dispatcher)
    assert result.failed == [round_id] and dispatcher.sent == []
    rnd = _round(db, round_id)
    assert RoundStatus(rnd.status) == RoundStatus.failed
    assert "lost 3 times" in rnd.error


def test_sweep_redispatches_queued_rounds_nobody_started(voted_env: Any, loop: Any) -> None:
    settings, db, _ = voted_env()
    round_id = loop.create_round(db)
    dispatcher = loop.RecordingDispatcher()
    assert round_schedule.sweep(db.write_session, dispatcher).redispatched == []  # just committed
    later = datetime.now(UTC) + timedelta(seconds=round_schedule.REDISPATCH_AFTER_S + 1)
    assert round_schedule.sweep(db.write_session, dispatcher, now=later).redispatched == [round_id]
    # Touched when re-sent: the next sweep, a moment later, leaves it alone.
    assert round_schedule.sweep(db.write_session, dispatcher, now=later).redispatched == []
    assert dispatcher.sent == [round_id]
    assert _round(db, round_id).celery_task_id == f"task-{round_id}-1"


def test_sweep_removes_the_work_dirs_of_ended_rounds_only(voted_env: Any, loop: Any) -> None:
    """A worker killed after its round's last database write leaves the round's work
    directory behind; the sweeper removes it, and never touches a live round's."""
    settings, db, _ = voted_env()
    ended, live = loop.create_round(db), loop.create_round(db)
    with db.transaction() as s:
        s.execute(
            update(TrainingRound)
            .where(TrainingRound.id == ended)
            .values(status=RoundStatus.succeeded)
        )
        s.execute(
            update(TrainingRound).where(TrainingRound.id == live).values(status=RoundStatus.running)
        )
    gone = live + ended + 1000  # no such round
    for rid in (ended, live, gone):
        d = rounds.work_dir(settings, rid) / "checkpoints"
        d.mkdir(parents=True)
        (d / "state.json").write_text("{}")
    other = rounds.work_dir(settings, 0).parent / "notes"  # not a round's directory
    other.mkdir()
    assert round_schedule.remove_finished_work_dirs(db.write_session, settings) == sorted(
        [ended, gone]
    )
    assert not rounds.work_dir(settings, ended).exists()
    assert not rounds.work_dir(settings, gone).exists()
    assert (rounds.work_dir(settings, live) / "checkpoints" / "state.json").is_file()
    assert other.is_dir()
    assert round_schedule.remove_finished_work_dirs(db.write_session, settings) == []


def test_schedule_starts_a_round_every_n_new_votes(voted_env: Any, loop: Any) -> None:
    settings, db, user = voted_env(round_every_n_pairs=3)
    dispatcher = loop.RecordingDispatcher()
    manual = loop.create_round(db, steps=3)
    rounds.run_round(manual, db.write_session, settings)
    assert _status(db, manual) == RoundStatus.succeeded
    # No new votes since that round's snapshot: nothing is due.
    assert round_schedule.maybe_schedule_round(db.write_session, settings, dispatcher) is None

    # A second annotator votes on every pair (at least 3 new training votes): a round is
    # queued, committed, then dispatched.
    assert loop.vote_on_within_pairs(db, loop.add_annotator(db, "second")) >= 3
    scheduled = round_schedule.maybe_schedule_round(db.write_session, settings, dispatcher)
    assert scheduled is not None and dispatcher.sent == [scheduled]
    rnd = _round(db, scheduled)
    assert RoundStatus(rnd.status) == RoundStatus.queued and rnd.created_by is None
    assert rnd.config["steps"] == 3  # the last succeeded round's config
    assert rnd.celery_task_id == f"task-{scheduled}-1"
    # One is active: no second round, however many votes.
    assert round_schedule.maybe_schedule_round(db.write_session, settings, dispatcher) is None
    assert dispatcher.sent == [scheduled]


def test_auto_publish_publishes_an_improved_version_in_the_same_transaction(
    voted_env: Any, loop: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, db, _ = voted_env()
    evaluate = rounds.evaluate_against_parent

    def improved(backbone: Any, n: int) -> dict[str, Any]:
        out = evaluate(backbone, n)
        # The tiny untrained model improves by chance only. auto_publish is the metric policy,
        # which needs the lower end of the judge delta's 95% interval above the margin (0).
        out.update(improved=True, judge_delta=0.05, judge_delta_sem=0.01)
        return out

    monkeypatch.setattr(rounds, "evaluate_against_parent", improved)
    round_id = loop.create_round(db)
    rounds.run_round(round_id, db.write_session, settings, auto_publish=True)
    (version,) = _versions_of(db, round_id)
    assert VersionStatus(version.status) == VersionStatus.published
    with db.read_session() as s:
        parent = s.get(ModelVersion, version.parent_id)
    assert VersionStatus(parent.status) == VersionStatus.retired
    m = _round(db, round_id).metrics
    assert m["published"] is True and m["publish_policy"] == "metric"
    assert m["policy_action"] == "published"


def test_a_corrupted_parent_adapter_fails_the_round(voted_env: Any, loop: Any) -> None:
    settings, db, _ = voted_env()
    first = loop.create_round(db)
    rounds.run_round(first, db.write_session, settings)
    (version,) = _versions_of(db, first)
    path: Path = settings.models_dir / version.adapter_path
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with db.transaction() as s:
        from backend.services import versions as version_service

        version_service.publish(s, version.id)
    second = loop.create_round(db)
    model_registry.clear_cache()
    rounds.run_round(second, db.write_session, settings)
    rnd = _round(db, second)
    assert RoundStatus(rnd.status) == RoundStatus.failed
    assert "refusing to load it" in rnd.error and "AdapterIntegrityError" in rnd.error


# ---------------------------------------------------------------------------- held-out votes
def test_a_round_that_learns_nothing_held_out_says_so_and_makes_no_candidate(
    voted_env: Any, loop: Any
) -> None:
    """Held-out pairs split by prompt, evaluated at steps 0, 2 and 4; a learning rate too small
    to move anything leaves the reference (step 0) the best, so no candidate is made."""
    settings, db, _ = voted_env()
    round_id = loop.create_round(
        db, holdout_fraction=0.3, learning_rate=1e-9, eval_every=2, eval_timesteps=2
    )
    rounds.run_round(round_id, db.write_session, settings, task_id="task-h")

    rnd = _round(db, round_id)
    assert RoundStatus(rnd.status) == RoundStatus.succeeded, rnd.error
    assert rnd.version_id is None and _versions_of(db, round_id) == []
    m = rnd.metrics
    assert m["candidate"] is False
    assert "no held-out evaluation improved" in m["no_candidate_reason"]
    assert m["heldout_pairs"] > 0 and m["pairs"] > 0
    assert [p["step"] for p in m["heldout"]] == [0, 2, 4]
    assert m["heldout"][0]["accuracy"] == 0.5
    assert m["heldout"][0]["loss"] == pytest.approx(0.693147, abs=1e-6)
    assert m["heldout"][0]["drift"] == 0.0 and m["best_step"] == 0
    with db.read_session() as s:
        rows = {
            r.step: r.extra
            for r in s.scalars(select(RoundMetric).where(RoundMetric.round_id == round_id))
        }
    assert rows[2]["heldout"]["step"] == 2 and rows[1]["heldout"] is None
    assert not (settings.models_dir / "versions" / f"round-{round_id}").exists()
    assert not rounds.work_dir(settings, round_id).exists()


def test_candidate_verdict_rules() -> None:
    from types import SimpleNamespace

    from worker.alignment.metrics import EvalMetrics

    def result(best_step: int, acc: float) -> Any:
        evals = [
            EvalMetrics(0, 0.5, 0.6931, 0.0, 0.0, 1.0, 1.0, 20),
            EvalMetrics(10, acc, 0.60, 0.1, 0.05, 1.0, 1.0, 20),
        ]
        best = next(e for e in evals if e.step == best_step)
        return SimpleNamespace(evals=evals, best_step=best_step, best_eval=best)

    assert rounds.candidate_verdict(result(10, 0.75), heldout_pairs=20, min_gain=0.02) is None
    assert rounds.candidate_verdict(result(10, 0.52), heldout_pairs=20, min_gain=0.02) is None
    low = rounds.candidate_verdict(result(10, 0.51), heldout_pairs=20, min_gain=0.02)
    assert low is not None and "0.510" in low and "min_heldout_gain=0.02" in low
    assert "improved" in (rounds.candidate_verdict(result(0, 0.9), 20, 0.02) or "")
    # no held-out pairs (too few prompts to split): not gated
    assert rounds.candidate_verdict(result(0, 0.5), heldout_pairs=0, min_gain=0.02) is None
