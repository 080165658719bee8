"""The task path end to end: a real ``celery worker`` subprocess runs ``pairs.generate`` and
``train.round`` against a SQLite database, over the embedded broker (kombu's SQLAlchemy
transport on SQLite) in a temporary directory.

The worker is the production module (``celery -A worker.celery_app worker``, every queue) with
its settings from ``PREFLOOP_*`` variables, exactly as ``prefloop demo`` starts it. The round is
sent the way the API sends it (``backend.dispatch.CeleryDispatcher``, by name, after the
commit). The worker is terminated in a ``finally``, whatever the outcome.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from kombu.transport import sqlalchemy as kombu_sqlalchemy
from sqlalchemy import func, select

from backend.db import Database
from backend.dispatch import CeleryDispatcher
from backend.models import ModelVersion, Pair, RoundMetric, RoundStatus, TrainingRound
from backend.queues import ALL_QUEUES, GENERATE_PAIRS, LOCAL_WORKERS, TASK_QUEUES, TRAIN_ROUND
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


@contextmanager
def _worker(env: dict[str, str], queues: str, log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``celery -A worker.celery_app worker -Q <queues>``, solo pool, terminated on exit."""
    cmd = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app",
        "worker",
        "--pool=solo",
        "-Q",
        queues,
        "--loglevel=INFO",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "--hostname",
        f"loop-test-{uuid.uuid4().hex[:8]}@%h",
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            yield proc
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


@pytest.fixture
def celery_worker(worker_env: dict[str, str], tmp_path: Path) -> Iterator[Path]:
    log_path = tmp_path / "worker.log"
    with _worker(worker_env, ALL_QUEUES, log_path):
        yield log_path


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

        # train.round, sent as the API sends it: after the commit, by name, to the train queue.
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


def test_pool_refills_while_a_round_trains(
    worker_env: dict[str, str], tmp_path: Path, loop: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The demo's layout (``backend.queues.LOCAL_WORKERS``): a ``train`` worker and a
    ``sample,cpu`` worker. While the first is inside a round, ``pairs.generate`` runs on the
    second and fills the pool; then the round is cancelled."""
    for key, value in worker_env.items():
        if key.startswith("PREFLOOP_"):
            monkeypatch.setenv(key, value)
    from backend.services import rounds as round_service
    from backend.settings import Settings

    settings = Settings()
    app = create_celery(settings)
    db = Database(settings.db_url, pool_size=2, max_overflow=2)
    (sample_name, sample_queues), (train_name, train_queues) = LOCAL_WORKERS.items()
    assert TASK_QUEUES[GENERATE_PAIRS] in sample_queues.split(",")
    assert train_queues.split(",") == [TASK_QUEUES[TRAIN_ROUND]]
    sample_log, train_log = tmp_path / f"{sample_name}.log", tmp_path / f"{train_name}.log"
    # Each worker serves its own Prometheus metrics.
    sample_port, train_port = _free_port(), _free_port()
    sample_env = {**worker_env, "PREFLOOP_WORKER_METRICS_PORT": str(sample_port)}
    train_env = {**worker_env, "PREFLOOP_WORKER_METRICS_PORT": str(train_port)}
    with (
        _worker(sample_env, sample_queues, sample_log),
        _worker(train_env, train_queues, train_log),
    ):
        try:
            assert app.send_task(GENERATE_PAIRS).get(timeout=TASK_TIMEOUT_S) == 6
            user = loop.add_annotator(db)
            assert loop.vote_on_within_pairs(db, user) == 6  # overlap 1: all 6 are done
            # Long enough never to finish on its own here: the test cancels it.
            round_id = loop.create_round(db, steps=100_000, max_epochs=None, checkpoint_every=1000)
            CeleryDispatcher(settings).dispatch_round(round_id)

            def training() -> TrainingRound | None:
                with db.read_session() as s:
                    rnd = s.get(TrainingRound, round_id)
                    assert not RoundStatus(rnd.status).finished, (rnd.status, rnd.error)
                    return rnd if rnd.step >= 1 else None

            started = _wait_for(training, TASK_TIMEOUT_S, train_log, "the round's first step")
            made = app.send_task(GENERATE_PAIRS).get(timeout=TASK_TIMEOUT_S)
            with db.read_session() as s:
                rnd = s.get(TrainingRound, round_id)
                # The refill ran to the end while the round kept training on the other worker.
                assert RoundStatus(rnd.status) == RoundStatus.running, rnd.status
                assert rnd.step > started.step
                ready = s.scalar(select(func.count()).select_from(Pair).where(Pair.active))
            assert made == 6 and ready == 6
            # Each task ran where its queue sends it ("Task <name>[<id>] received").
            assert "Task pairs.generate[" not in train_log.read_text(errors="replace")
            assert "Task train.round[" not in sample_log.read_text(errors="replace")
            assert "Task pairs.generate[" in sample_log.read_text(errors="replace")

            with db.transaction() as s:
                round_service.cancel_round(s, round_id)

            def stopped() -> bool:
                # The worker notices within a second or a step; its task then ends normally.
                text = train_log.read_text(errors="replace")
                return re.search(r"Task train\.round\[[^\]]+\] succeeded", text) is not None

            _wait_for(stopped, TASK_TIMEOUT_S, train_log, "the cancelled round's task to end")

            sampled = _scrape(sample_port)
            assert _value(sampled, "prefloop_pairs_sampled_total") == 12
            assert _value(sampled, "prefloop_pool_refill_seconds_count") == 2
            trained = _scrape(train_port)
            assert _value(trained, 'prefloop_rounds_finished_total{status="cancelled"}') == 1
            assert _value(trained, 'prefloop_round_duration_seconds_count{status="cancelled"}') == 1
            assert _value(trained, "prefloop_round_steps_total") >= started.step
            assert _value(trained, "prefloop_round_steps_per_second") > 0
        finally:
            db.dispose()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _scrape(port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def _value(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{series} not in the worker's metrics:\n{text[-3000:]}")
