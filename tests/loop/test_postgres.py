"""The loop's SQL on PostgreSQL (the ``docker compose`` database): a pool refill and a round,
with row locks (``FOR UPDATE``) and the metric upsert (``ON CONFLICT DO UPDATE``) of that
dialect. A fresh database is created on the server and dropped afterwards; the test is skipped
when the server is unreachable."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import make_url

from backend.db import Database
from backend.migrate import upgrade
from backend.models import ModelVersion, RoundMetric, RoundStatus, TrainingRound
from backend.settings import Settings
from worker import model_registry, pair_pool, round_schedule, rounds

PG_ADMIN_URL = os.environ.get(
    "PREFLOOP_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)

pytestmark = pytest.mark.postgres


@pytest.fixture
def pg_url() -> Iterator[str]:
    try:
        admin = create_engine(
            PG_ADMIN_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3}
        )
        with admin.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001
        # In CI (`make test` starts the server) a missing PostgreSQL is a failure, not a skip.
        (pytest.fail if os.environ.get("CI") else pytest.skip)(
            f"PostgreSQL not reachable at {PG_ADMIN_URL}: {exc}"
        )
    name = f"prefloop_loop_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    try:
        upgrade(url)
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def test_refill_and_round_on_postgresql(
    pg_url: str, tmp_path: Path, tiny_checkpoint: Path, loop: Any
) -> None:
    settings = Settings(
        data_dir=tmp_path,
        database_url=pg_url,
        base_model=str(tiny_checkpoint),
        pair_pool_target=8,
        pair_overlap=1,
        gold_fraction=0.25,
        admin_password="unused-admin-password",
        secret_key="unused-secret-key-0123456789-abcdefghijklmnop",
    )
    db = Database(settings.db_url, pool_size=3, max_overflow=2)
    model_registry.clear_cache()
    try:
        assert pair_pool.refill_pool(db.write_session, settings, seed=0) == 8
        loop.vote_on_within_pairs(db, loop.add_annotator(db))
        round_id = loop.create_round(db)
        rounds.run_round(round_id, db.write_session, settings, task_id="pg-task")
        with db.read_session() as s:
            rnd = s.get(TrainingRound, round_id)
            assert RoundStatus(rnd.status) == RoundStatus.succeeded, rnd.error
            version = s.get(ModelVersion, rnd.version_id)
            assert (
                s.scalar(
                    select(func.count())
                    .select_from(RoundMetric)
                    .where(RoundMetric.round_id == round_id)
                )
                == loop.TINY_ROUND["steps"]
            )
        adapter = settings.models_dir / version.adapter_path
        assert hashlib.sha256(adapter.read_bytes()).hexdigest() == version.adapter_sha256
        rounds.run_round(round_id, db.write_session, settings, task_id="pg-task")
        with db.read_session() as s:
            again = s.get(TrainingRound, round_id)
            assert (again.status, again.attempts, again.updated_at) == (
                rnd.status,
                rnd.attempts,
                rnd.updated_at,
            )
        assert round_schedule.sweep(db.write_session, loop.RecordingDispatcher()).requeued == []
    finally:
        db.dispose()
        model_registry.clear_cache()
