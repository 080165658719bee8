"""SIGKILL a real Celery worker mid-round, restart it, and check that the round finishes
exactly once.

A scenario runs the production worker (``celery -A worker.celery_app worker``, solo pool, on
the embedded SQLite broker in a temporary directory) on a small built-in model:

1. the worker makes pairs, an annotator votes on them, and a round is dispatched as the API
   dispatches it;
2. the worker is killed with SIGKILL at a point of the round:

   - ``training``: from outside, once the round has written metrics for a step;
   - ``evaluation``: by the worker itself, on entering the judge's evaluation (the round is
     ``evaluating``);
   - ``after_artifact``: by the worker itself, right after the adapter file was copied to its
     final path and before the transaction that inserts the version and marks the round
     ``succeeded``;
   - ``random``: from outside, after a random delay once the round runs (it may also land
     after the round finished);

3. at the kill, no version row may exist without its complete adapter file;
4. a new worker is started, and the sweeper (``rounds.sweep`` with no grace period) re-queues
   the round that lost its worker;
5. the round must end ``succeeded`` with exactly one version, whose adapter file has the
   recorded SHA-256, and nothing may be left over: no other directory under
   ``models/versions``, no temporary file, no work directory under ``models/rounds``.

``tests/loop/test_worker_kill.py`` runs the three named points once each.

    python -m bench.worker_kill              # 20 kills at random points; prints the tally
    python -m bench.worker_kill --quick      # 3 kills
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backend.queues import ALL_QUEUES

REPO_ROOT = Path(__file__).resolve().parents[1]
KILL_ENV = "PREFLOOP_TEST_KILL_AT"
POINTS = ("training", "evaluation", "after_artifact")
TIMEOUT_S = 240.0

ROUND_CONFIG = {
    "steps": 12,
    "batch_size": 2,
    "learning_rate": 1e-3,
    "lora_rank": 2,
    "checkpoint_every": 2,
    "eval_prompts": 4,
    "holdout_fraction": 0.0,
}


# -- the worker process ----------------------------------------------------------------------


def worker_main(argv: list[str]) -> None:
    """The worker's entry point: the production Celery worker, with the kill hook that
    ``PREFLOOP_TEST_KILL_AT`` names installed first (test-only; nothing in ``worker/``
    changes)."""
    point = os.environ.get(KILL_ENV, "")
    if point in ("evaluation", "after_artifact"):
        import worker.rounds as rounds

        def die() -> None:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        if point == "evaluation":

            def evaluate(*args: Any, **kwargs: Any) -> Any:
                die()

            rounds.evaluate_against_parent = evaluate  # type: ignore[assignment]
        else:
            real_upload = rounds._upload_adapter

            def upload_then_die(artifacts: Any, src: Path, rel: str) -> str:
                real_upload(artifacts, src, rel)
                die()
                raise AssertionError("unreachable")

            rounds._upload_adapter = upload_then_die  # type: ignore[assignment]
    from celery.__main__ import main

    sys.argv = ["celery", *argv]
    main()


# -- one scenario ----------------------------------------------------------------------------


@dataclass
class Outcome:
    point: str
    killed: bool
    state_at_kill: str = ""
    artifact_at_kill: bool = False
    versions_at_kill: int = 0
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    #: The round's ``finished_at - started_at`` (sizes the random delays).
    round_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.notes


def _build_checkpoint(root: Path) -> Path:
    from worker.shapes.model import BuiltinConfig, build_builtin, save_builtin

    cfg = BuiltinConfig(
        block_out_channels=(16, 32, 32),
        attention_heads=2,
        text_hidden_size=32,
        text_layers=1,
        text_heads=2,
        num_inference_steps=4,
        seed=0,
    )
    path = root / "tiny-shapes"
    save_builtin(build_builtin(cfg), path)
    return path


class Worker:
    def __init__(self, env: dict[str, str], log: Path, kill_at: str | None) -> None:
        env = dict(env)
        if kill_at:
            env[KILL_ENV] = kill_at
        cmd = [
            sys.executable,
            "-m",
            "bench.worker_kill",
            "--worker",
            "-A",
            "worker.celery_app",
            "worker",
            "--pool=solo",
            "-Q",
            ALL_QUEUES,
            "--loglevel=INFO",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "--hostname",
            f"kill-{uuid.uuid4().hex[:8]}@%h",
        ]
        self.log = log
        with open(log, "ab") as fh:
            self.proc = subprocess.Popen(
                cmd, cwd=REPO_ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT
            )

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


def _wait(predicate: Any, timeout: float, what: str, log: Path) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
    raise TimeoutError(f"timed out waiting for {what}; worker log:\n{tail}")


def run_scenario(
    point: str,
    checkpoint: Path,
    root: Path,
    *,
    rng: random.Random,
    max_delay: float = 6.0,
) -> Outcome:
    """One kill at ``point`` (see the module doc) and the recovery; the outcome's notes list
    every broken promise."""
    from sqlalchemy import func, select

    from backend.db import Database
    from backend.dispatch import CeleryDispatcher
    from backend.migrate import upgrade
    from backend.models import (
        Choice,
        ModelVersion,
        Pair,
        PairKind,
        RoundMetric,
        RoundStatus,
        TrainingRound,
        User,
        Vote,
    )
    from backend.queues import GENERATE_PAIRS
    from backend.round_config import RoundConfig
    from backend.services import rounds as round_service
    from backend.settings import Settings
    from worker.celery_app import create_celery
    from worker.round_schedule import sweep

    started = time.monotonic()
    data = root / f"data-{uuid.uuid4().hex[:6]}"
    data.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFLOOP_")}
    env.update(
        PREFLOOP_DATA_DIR=str(data),
        PREFLOOP_BASE_MODEL=str(checkpoint),
        PREFLOOP_PAIR_POOL_TARGET="8",
        PREFLOOP_PAIR_OVERLAP="1",
        PREFLOOP_GOLD_FRACTION="0",
        PREFLOOP_LOG_JSON="false",
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    settings = Settings(
        **{
            k.removeprefix("PREFLOOP_").lower(): v
            for k, v in env.items()
            if k.startswith("PREFLOOP_")
        }
    )
    upgrade(settings.db_url)
    db = Database(settings.db_url, pool_size=2, max_overflow=2)
    log = data / "worker.log"
    out = Outcome(point=point, killed=False)
    first = Worker(env, log, point if point in ("evaluation", "after_artifact") else None)
    second: Worker | None = None
    try:
        app = create_celery(settings)
        app.send_task(GENERATE_PAIRS).get(timeout=TIMEOUT_S)
        with db.transaction() as s:
            user = User(username="ann", password_hash="x")
            s.add(user)
            s.flush()
            for p in s.scalars(select(Pair).where(Pair.kind == PairKind.within_version)):
                s.add(
                    Vote(
                        user_id=user.id,
                        pair_id=p.id,
                        choice=Choice.left,
                        winner_image_id=p.image_a_id,
                    )
                )
        with db.transaction() as s:
            round_id = round_service.create_round(
                s,
                RoundConfig(**{**ROUND_CONFIG, "steps": 40 if point == "training" else 12}),
                created_by=None,
            ).id
        dispatcher = CeleryDispatcher(settings)
        dispatcher.dispatch_round(round_id)

        def status() -> RoundStatus:
            with db.read_session() as s:
                return RoundStatus(s.get(TrainingRound, round_id).status)

        if point == "training":
            # 40 steps for this point: metrics are flushed once a second, so the first rows
            # come while training still has seconds to go.
            def stepped() -> bool:
                with db.read_session() as s:
                    n = s.scalar(
                        select(func.count())
                        .select_from(RoundMetric)
                        .where(RoundMetric.round_id == round_id)
                    )
                return bool(n) or status().finished

            _wait(stepped, TIMEOUT_S, "a training step", log)
            first.kill()
        elif point == "random":
            _wait(lambda: status() != RoundStatus.queued, TIMEOUT_S, "the round to start", log)
            time.sleep(rng.uniform(0.0, max_delay))
            first.kill()
        else:  # the worker kills itself at the hook
            _wait(
                lambda: first.proc.poll() is not None or status().finished,
                TIMEOUT_S,
                f"the kill at {point}",
                log,
            )
            first.kill()
        out.killed = first.proc.returncode == -signal.SIGKILL
        out.state_at_kill = status().value

        # Adapters live at versions/round-<id>/<attempt prefix>/ (worker/rounds.py).
        out.artifact_at_kill = any((settings.models_dir / "versions").glob("*/*/adapter*"))
        # No half-published version: a row only with its complete file behind it.
        with db.read_session() as s:
            at_kill = s.scalars(
                select(ModelVersion).where(ModelVersion.created_by_round == round_id)
            ).all()
            out.versions_at_kill = len(at_kill)
            for v in at_kill:
                path = settings.models_dir / (v.adapter_path or "")
                if (
                    not path.is_file()
                    or hashlib.sha256(path.read_bytes()).hexdigest() != v.adapter_sha256
                ):
                    out.notes.append(f"at the kill: version {v.id} without its complete adapter")
        if point in ("training", "evaluation", "after_artifact") and not out.killed:
            out.notes.append(f"the worker was not killed at {point} (round {out.state_at_kill})")

        second = Worker(env, log, None)
        if not status().finished:
            swept = sweep(db.write_session, dispatcher, stale_after_s=0.0)
            if round_id not in swept.requeued + swept.redispatched:
                out.notes.append(f"the sweeper did not re-queue round {round_id}: {swept}")
        _wait(lambda: status().finished, TIMEOUT_S, f"round {round_id} to finish", log)
        # A graceful stop lets the task that finished the round end (its clean-up follows the
        # commit), so what is left on disk after this is left for good.
        second.stop()

        with db.read_session() as s:
            rnd = s.get(TrainingRound, round_id)
            if rnd.started_at and rnd.finished_at:
                out.round_seconds = (rnd.finished_at - rnd.started_at).total_seconds()
            versions = s.scalars(
                select(ModelVersion).where(ModelVersion.created_by_round == round_id)
            ).all()
            total = s.scalar(select(func.count()).select_from(ModelVersion))
            steps = s.scalars(
                select(RoundMetric.step).where(RoundMetric.round_id == round_id)
            ).all()
        if RoundStatus(rnd.status) != RoundStatus.succeeded:
            out.notes.append(f"round ended {rnd.status}: {rnd.error}")
        if (
            len(versions) != 1
            or total != 2
            or rnd.version_id != (versions[0].id if versions else None)
        ):
            out.notes.append(f"{len(versions)} versions for the round ({total} in all)")
        for v in versions:
            path = settings.models_dir / (v.adapter_path or "")
            if (
                not path.is_file()
                or hashlib.sha256(path.read_bytes()).hexdigest() != v.adapter_sha256
            ):
                out.notes.append(f"version {v.id}: adapter missing or not the recorded bytes")
        if sorted(steps) != sorted(set(steps)):
            out.notes.append("duplicate metric rows")
        # Only the published attempt's prefix is left: a dead attempt's is removed.
        version_dirs = {
            p.relative_to(settings.models_dir).as_posix()
            for p in (settings.models_dir / "versions").glob("*/*")
        }
        published = {str(Path(v.adapter_path or "").parent.as_posix()) for v in versions}
        if version_dirs != published or not all(
            d.startswith(f"versions/round-{round_id}/") for d in version_dirs
        ):
            out.notes.append(f"left in models/versions: {sorted(version_dirs)}")
        leftovers = [
            str(p.relative_to(settings.models_dir))
            for p in settings.models_dir.rglob("*")
            if p.name.startswith((".tmp", "tmp")) or p.suffix in (".tmp", ".part")
        ]
        rounds_dir = settings.models_dir / "rounds"
        if rounds_dir.exists():
            leftovers += [str(p.relative_to(settings.models_dir)) for p in rounds_dir.iterdir()]
        if leftovers:
            out.notes.append(f"orphaned files: {leftovers[:5]}")
    except TimeoutError as exc:
        out.notes.append(str(exc)[:2000])
    finally:
        first.stop()
        if second is not None:
            second.stop()
        db.dispose()
        out.seconds = time.monotonic() - started
        if out.ok:
            shutil.rmtree(data, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        worker_main(argv[1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 kills instead of 20")
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    n = 3 if args.quick else args.kills
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="prefloop-kill-"))
    checkpoint = _build_checkpoint(root)
    tally: collections.Counter[str] = collections.Counter()
    failures = []
    # The random delay spans a round's length on this machine: 1.2 x the longest round seen
    # so far that ran uninterrupted (6 s before the first), so some kills land after the
    # round finished.
    max_delay = 6.0
    longest = 0.0
    for i in range(n):
        out = run_scenario("random", checkpoint, root, rng=rng, max_delay=max_delay)
        if out.state_at_kill == "succeeded":  # ran uninterrupted: its whole length
            longest = max(longest, out.round_seconds)
        max_delay = max(1.0, 1.2 * longest)
        key = f"killed while {out.state_at_kill}" if out.killed else "finished before the kill"
        tally[key] += 1
        tally["ok" if out.ok else "FAILED"] += 1
        print(
            f"kill {i + 1}/{n}: {key}; {'ok' if out.ok else 'FAILED: ' + '; '.join(out.notes)}"
            f" ({out.seconds:.0f} s)",
            flush=True,
        )
        if not out.ok:
            failures.append(out)
    print("tally: " + ", ".join(f"{k}: {v}" for k, v in sorted(tally.items())))
    if not failures:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
