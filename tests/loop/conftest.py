"""Fixtures for the loop tests: a real SQLite database at ``alembic upgrade head`` per test, a
tiny ``builtin:shapes`` checkpoint, and helpers that fill the database with pairs and votes.

The checkpoint is a freshly initialised (untrained) built-in model with small UNet channels
and 4 sampling steps, saved with :func:`worker.shapes.model.save_builtin` once per session;
settings name it by path (``PREFLOOP_BASE_MODEL=<dir>``), which the model registry loads
with :func:`worker.shapes.model.load_builtin`. Everything else (storage, adapters, trainer,
judge) is the real code.

The migrated database is built once per session and copied for each test (a fresh file each
time, so tests never see each other's rows).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from backend.db import Database
from backend.migrate import upgrade
from backend.models import Choice, Pair, PairKind, User, Vote
from backend.round_config import RoundConfig
from backend.services import rounds as round_service
from backend.settings import Settings
from worker import model_registry

#: A small, fast round: a handful of LoRA steps on CPU, a 4-prompt judge evaluation.
TINY_ROUND = {
    "steps": 4,
    "batch_size": 2,
    "learning_rate": 1e-3,
    "lora_rank": 2,
    "checkpoint_every": 2,
    "eval_prompts": 4,
    # The votes of these tests cycle through the choices: no preference to learn, so the
    # held-out gate would (rightly) refuse a candidate. The mechanics tests train on every pair;
    # test_rounds.py's held-out tests switch it on.
    "holdout_fraction": 0.0,
}


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> None:
    # The test machines have 2 shared cores; torch's intra-op threads fighting other processes
    # for them made these tiny models ~8x slower than one thread does.
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
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
    path = tmp_path_factory.mktemp("checkpoint") / "tiny-shapes"
    save_builtin(build_builtin(cfg), path)
    return path


@pytest.fixture(scope="session")
def migrated_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "template.db"
    upgrade(f"sqlite:///{path}")
    return path


def make_settings(data_dir: Path, checkpoint: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "database_url": f"sqlite:///{data_dir / 'prefloop.db'}",
        "base_model": str(checkpoint),
        "pair_pool_target": 12,
        "pair_overlap": 1,
        "gold_fraction": 0.0,
        "log_json": False,
        "log_level": "WARNING",
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def make_env(
    tmp_path: Path, tiny_checkpoint: Path, migrated_db: Path
) -> Iterator[Callable[..., tuple[Settings, Database]]]:
    """``make_env(**setting_overrides) -> (settings, database)`` on a fresh migrated SQLite."""
    made: list[Database] = []

    def make(**overrides: Any) -> tuple[Settings, Database]:
        data_dir = tmp_path / f"data{len(made)}"
        data_dir.mkdir()
        shutil.copyfile(migrated_db, data_dir / "prefloop.db")
        settings = make_settings(data_dir, tiny_checkpoint, **overrides)
        db = Database(settings.db_url, pool_size=5, max_overflow=5)
        made.append(db)
        return settings, db

    model_registry.clear_cache()
    yield make
    for db in made:
        db.dispose()
    model_registry.clear_cache()


def add_annotator(db: Database, name: str = "ann") -> int:
    with db.transaction() as s:
        user = User(username=name, password_hash="not-a-real-hash")
        s.add(user)
        s.flush()
        return user.id


def vote_on_within_pairs(db: Database, user_id: int, *, choices: list[Choice] | None = None) -> int:
    """Vote on every within-version pair (``choices`` cycled; default: always side a).
    Writes the votes as the API would resolve them (winner = the chosen image)."""
    choices = choices or [Choice.left]
    with db.transaction() as s:
        pairs = s.scalars(
            select(Pair).where(Pair.kind == PairKind.within_version).order_by(Pair.id)
        ).all()
        for i, p in enumerate(pairs):
            choice = choices[i % len(choices)]
            winner = {Choice.left: p.image_a_id, Choice.right: p.image_b_id}.get(choice)
            s.add(Vote(user_id=user_id, pair_id=p.id, choice=choice, winner_image_id=winner))
        return len(pairs)


def create_round(db: Database, **config: Any) -> int:
    with db.transaction() as s:
        rnd = round_service.create_round(
            s, RoundConfig(**{**TINY_ROUND, **config}), created_by=None
        )
        return rnd.id


class RecordingDispatcher:
    """A dispatcher that records what it was asked to send."""

    def __init__(self) -> None:
        self.sent: list[int] = []

    def dispatch_round(self, round_id: int) -> str | None:
        self.sent.append(round_id)
        return f"task-{round_id}-{len(self.sent)}"

    def cancel_round(self, round_id: int, task_id: str | None) -> None:
        return None


@pytest.fixture
def loop() -> Any:
    """The helpers above, for test modules (``--import-mode=importlib`` cannot import conftest)."""
    from types import SimpleNamespace

    return SimpleNamespace(
        add_annotator=add_annotator,
        vote_on_within_pairs=vote_on_within_pairs,
        create_round=create_round,
        RecordingDispatcher=RecordingDispatcher,
        TINY_ROUND=TINY_ROUND,
    )
