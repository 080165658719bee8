"""The task path end to end: a real ``celery worker`` subprocess runs ``pairs.generate`` and
``train.round`` against a SQLite database, over the embedded broker (kombu's SQLAlchemy
transport on SQLite) in a temporary directory.

The worker is the production module (``celery -A worker.celery_app worker -Q gpu,cpu``) with
its settings from ``PREFLOOP_*`` variables, exactly as ``prefloop demo`` starts it. The round is
sent the way the API sends it (``backend.dispatch.CeleryDispatcher``, by name, after the
commit). The worker is terminated in a ``finally``, whatever the outcome.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kombu.transport import sqlalchemy as kombu_sqlalchemy
from sqlalchemy import func, select

from backend.db import Database
from backend.dispatch import CeleryDispatcher
from backend.models import ModelVersion, Pair, RoundMetric, RoundStatus, TrainingRound
from backend.queues import ALL_QUEUES, GENERATE_PAIRS, TRAIN_ROUND
from worker.celery_app import create_celery

REPO_ROOT = Path(__file__).resolve().parents[2]
TASK_TIMEOUT_S = 180.0

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _restore_sqla_polling_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    # create_celery sets it on the transport class, process-wide; undo that after the test.
    monkeypatch.setattr(
        kombu_sqlalchemy.Transport, "polling_interval", kombu_sqlalchemy.Transport.polling_interval
    )


@pytest.fixture
def worker_env(tmp_path: Path, tiny_checkpoint: Path, migrated_db: Path) -> dict[str, str]:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    shutil.copyfile(migrated_db, data_dir / "prefloop.db")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFLOOP_")}
    env.update(
        PREFLOOP_DATA_DIR=str(data_dir),
        PREFLOOP_BASE_MODEL=str(tiny_checkpoint),
        PREFLOOP_PAIR_POOL_TARGET="6",
        PREFLOOP_PAIR_OVERLAP="1",
        PREFLOOP_GOLD_FRACTION="0",
        PREFLOOP_LOG_JSON="false",
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",  # 2 shared cores: one torch thread is faster (see conftest)
        PYTHONUNBUFFERED="1",
    )
    return env


@pytest.fixture
def celery_worker(worker_env: dict[str, str], tmp_path: Path) -> Iterator[Path]:
    log_path = tmp_path / "worker.log"
    cmd = [
        sys.executable,
        "-m",
        "celery",
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
        f"loop-test-{uuid.uuid4().hex[:8]}@%h",
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, cwd=REPO_ROOT, env=worker_env, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            yield log_path
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def _wait_for(predicate: Any, timeout: float, log_path: Path, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    tail = log_path.read_text(errors="replace")[-4000:]
    raise AssertionError(f"timed out waiting for {what}; worker log:\n{tail}")


def test_worker_generates_pairs_and_trains_a_round(
    celery_worker: Path, worker_env: dict[str, str], loop: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in worker_env.items():
        if key.startswith("PREFLOOP_"):
            monkeypatch.setenv(key, value)
    from backend.settings import Settings

    settings = Settings()
    app = create_celery(settings)
    db = Database(settings.db_url, pool_size=2, max_overflow=2)
    try:
        # pairs.generate, by name, on the queue beat uses.
        made = app.send_task(GENERATE_PAIRS).get(timeout=TASK_TIMEOUT_S)
        assert made == 6
        with db.read_session() as s:
            assert s.scalar(select(func.count()).select_from(Pair)) == 6

        user = loop.add_annotator(db)
        loop.vote_on_within_pairs(db, user)
        round_id = loop.create_round(db, steps=3)

        # train.round, sent as the API sends it: after the commit, by name, to the gpu queue.
        task_id = CeleryDispatcher(settings).dispatch_round(round_id)

        def finished() -> TrainingRound | None:
            with db.read_session() as s:
                rnd = s.get(TrainingRound, round_id)
                return rnd if RoundStatus(rnd.status).finished else None

        rnd = _wait_for(finished, TASK_TIMEOUT_S, celery_worker, f"round {round_id}")
        assert RoundStatus(rnd.status) == RoundStatus.succeeded, rnd.error
        assert rnd.celery_task_id == task_id and rnd.attempts == 1
        with db.read_session() as s:
            version = s.get(ModelVersion, rnd.version_id)
            metric_rows = s.scalar(
                select(func.count())
                .select_from(RoundMetric)
                .where(RoundMetric.round_id == round_id)
            )
        assert metric_rows == 3
        adapter = settings.models_dir / version.adapter_path
        assert hashlib.sha256(adapter.read_bytes()).hexdigest() == version.adapter_sha256

        # The same round delivered again through the worker: it finishes and changes nothing.
        app.send_task(TRAIN_ROUND, args=[round_id]).get(timeout=TASK_TIMEOUT_S)
        with db.read_session() as s:
            again = s.get(TrainingRound, round_id)
            assert (again.status, again.attempts, again.version_id, again.updated_at) == (
                rnd.status,
                rnd.attempts,
                rnd.version_id,
                rnd.updated_at,
            )
            assert s.scalar(select(func.count()).select_from(ModelVersion)) == 2
    finally:
        db.dispose()
