"""Fixtures for the backend tests: every API test runs on SQLite *and* PostgreSQL.

Isolation: one fresh database per test session and dialect (a temporary SQLite file; a
``prefloop_test_<random>`` PostgreSQL database created on the server and dropped at the end),
brought to head with ``alembic upgrade head``. One app per dialect; before each test every
table is emptied (``TRUNCATE ... RESTART IDENTITY`` on PostgreSQL, ``DELETE`` on SQLite) and
the admin account and base version are re-created. Truncation instead of a rolled-back outer
transaction because the API commits for real, and the concurrency tests need commits that
other connections see.

PostgreSQL: ``PREFLOOP_TEST_PG_URL`` (default ``postgresql+psycopg://postgres@127.0.0.1:5432/test``)
names a maintenance database; tests marked ``postgres`` are skipped when it is unreachable.
"""

from __future__ import annotations

import io
import os
import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image as PILImage
from sqlalchemy import create_engine, select, text, update
from sqlalchemy.engine import make_url

from backend.api.state import AppState
from backend.db import Database
from backend.main import bootstrap, create_app
from backend.migrate import upgrade
from backend.models import (
    Base,
    GoldAnswer,
    ModelVersion,
    PairKind,
    Prompt,
    User,
    UserRole,
    VersionStatus,
)
from backend.services import images as image_service
from backend.services import pairs as pair_service
from backend.settings import Settings

PG_ADMIN_URL = os.environ.get(
    "PREFLOOP_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
ADMIN_PASSWORD = "admin-password-1"


def _pg_available() -> bool:
    try:
        engine = create_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
        return True
    except Exception:  # noqa: BLE001
        return False


@pytest.fixture(scope="session")
def pg_server() -> str:
    if not _pg_available():
        # In CI (`make test` starts the server) a missing PostgreSQL is a failure, not a skip.
        (pytest.fail if os.environ.get("CI") else pytest.skip)(
            f"PostgreSQL not reachable at {PG_ADMIN_URL}; start it with scripts/services.sh"
        )
    return PG_ADMIN_URL


def create_pg_database(admin_url: str) -> tuple[str, callable]:
    name = f"prefloop_test_{uuid.uuid4().hex[:12]}"
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)

    def drop() -> None:
        with engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        engine.dispose()

    return url, drop


@pytest.fixture(
    scope="session",
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)],
)
def db_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'test.db'}"
        upgrade(url)
        yield url
        return
    admin_url = request.getfixturevalue("pg_server")
    url, drop = create_pg_database(admin_url)
    try:
        upgrade(url)
        yield url
    finally:
        drop()


def make_settings(db_url: str, data_dir: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "database_url": db_url,
        "data_dir": data_dir,
        "admin_password": ADMIN_PASSWORD,
        "secret_key": "test-secret-key-0123456789-abcdefghijklmnop",
        "argon2_time_cost": 1,
        "argon2_memory_kib": 64,
        "max_upload_bytes": 256 * 1024,
        "login_rate_limit_attempts": 5,
        "login_rate_limit_window_seconds": 60,
        "gold_fraction": 0.0,
        "quality_max_age_seconds": 0.0,  # every test sees its own votes' report
        "log_json": True,
        "log_level": "WARNING",
        "open_signup": True,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


class RecordingDispatcher:
    """Records dispatches, and checks that the round is already committed when dispatched
    (it looks the row up through a separate connection)."""

    def __init__(self) -> None:
        self.dispatched: list[int] = []
        self.cancelled: list[int] = []
        self.committed_at_dispatch: list[bool] = []
        self.db: Database | None = None

    def dispatch_round(self, round_id: int) -> str | None:
        from backend.models import TrainingRound

        assert self.db is not None
        with self.db.read_session() as s:
            self.committed_at_dispatch.append(s.get(TrainingRound, round_id) is not None)
        self.dispatched.append(round_id)
        return f"task-{round_id}"

    def cancel_round(self, round_id: int, task_id: str | None) -> None:
        self.cancelled.append(round_id)


@dataclass
class Env:
    """One dialect's app, client and helpers."""

    client: TestClient
    state: AppState
    dispatcher: RecordingDispatcher
    dialect: str
    _rng: random.Random = field(default_factory=lambda: random.Random(1234))

    # -- accounts ----------------------------------------------------------------------------
    def user(
        self, username: str = "ann", role: UserRole = UserRole.annotator, **kw: object
    ) -> tuple[int, dict[str, str]]:
        with self.state.db.transaction() as s:
            u = User(
                username=username,
                password_hash=self.state.passwords.hash("password-123"),
                role=role,
                **kw,
            )
            s.add(u)
            s.flush()
            uid = u.id
        return uid, self.headers(uid, role)

    def headers(self, user_id: int, role: UserRole = UserRole.annotator) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.state.tokens.issue(user_id, role.value)}"}

    def login(self, username: str, password: str) -> object:
        return self.client.post(
            "/api/v1/auth/token", data={"username": username, "password": password}
        )

    def admin_headers(self) -> dict[str, str]:
        with self.state.db.read_session() as s:
            uid = s.scalar(
                select(User.id).where(User.username == self.state.settings.admin_username)
            )
        assert uid is not None
        return self.headers(uid, UserRole.admin)

    # -- content -----------------------------------------------------------------------------
    def png(self) -> bytes:
        im = PILImage.new("RGB", (4, 4), tuple(self._rng.randrange(256) for _ in range(3)))
        im.putpixel((0, 0), tuple(self._rng.randrange(256) for _ in range(3)))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()

    def version(
        self,
        name: str,
        status: VersionStatus = VersionStatus.candidate,
        parent_id: int | None = None,
    ) -> int:
        with self.state.db.transaction() as s:
            v = ModelVersion(
                name=name,
                base_model="builtin:shapes",
                status=status,
                parent_id=parent_id,
                metrics={},
            )
            s.add(v)
            s.flush()
            return v.id

    def base_version_id(self) -> int:
        with self.state.db.read_session() as s:
            vid = s.scalar(select(ModelVersion.id).where(ModelVersion.name == "builtin:shapes"))
        assert vid is not None
        return vid

    def pairs(
        self, n: int, kind: PairKind = PairKind.within_version, version_b: int | None = None
    ) -> list[tuple[int, int, int]]:
        """Seed ``n`` pairs (each on its own prompt); returns (pair_id, image_a, image_b)."""
        version_a = self.base_version_id()
        if kind == PairKind.cross_version and version_b is None:
            version_b = self.version(f"v-{uuid.uuid4().hex[:6]}")
        out = []
        with self.state.db.transaction() as s:
            for _ in range(n):
                p = Prompt(text=f"a small red circle {uuid.uuid4().hex}", source="test")
                s.add(p)
                s.flush()
                ims = []
                for vid in (version_a, version_b if kind == PairKind.cross_version else version_a):
                    ims.append(
                        image_service.store_image(
                            s,
                            self.state.store,
                            version_id=vid,
                            prompt_id=p.id,
                            data=self.png(),
                            seed=self._rng.randrange(2**31),
                            cfg=7.5,
                            steps=20,
                            sampler="ddim",
                            width=4,
                            height=4,
                        )
                    )
                pair = pair_service.create_pair(
                    s,
                    kind=kind,
                    image_a_id=ims[0].id,
                    image_b_id=ims[1].id,
                    gold_answer=GoldAnswer.a if kind == PairKind.gold else None,
                    rng=self._rng,
                )
                out.append((pair.id, ims[0].id, ims[1].id))
        return out

    def count(self, table: str) -> int:
        with self.state.db.read_session() as s:
            return int(s.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())

    def counts(self) -> dict[str, int]:
        with self.state.db.read_session() as s:
            return {
                t.name: int(s.execute(text(f"SELECT count(*) FROM {t.name}")).scalar_one())
                for t in Base.metadata.sorted_tables
            }


def truncate_all(db: Database) -> None:
    tables = [t.name for t in Base.metadata.sorted_tables]
    with db.transaction() as s:
        if db.dialect == "postgresql":
            s.execute(text(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE"))
        else:
            s.execute(update(ModelVersion).values(created_by_round=None))
            for name in reversed(tables):
                s.execute(text(f"DELETE FROM {name}"))


@pytest.fixture(scope="session")
def _session_env(db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    settings = make_settings(db_url, tmp_path_factory.mktemp("data"))
    dispatcher = RecordingDispatcher()
    app = create_app(settings, dispatcher)
    state: AppState = app.state.prefloop
    dispatcher.db = state.db
    with TestClient(app) as client:
        yield Env(client=client, state=state, dispatcher=dispatcher, dialect=state.db.dialect)


@pytest.fixture
def env(_session_env: Env) -> Env:
    """A clean database (admin + base version only) and a reset app."""
    state = _session_env.state
    truncate_all(state.db)
    bootstrap(state)
    state.login_limiter.reset()
    state.register_limiter.reset()
    _session_env.dispatcher.dispatched.clear()
    _session_env.dispatcher.cancelled.clear()
    _session_env.dispatcher.committed_at_dispatch.clear()
    return _session_env


@pytest.fixture
def client(env: Env) -> TestClient:
    return env.client
