"""Settings validation, local-mode defaults, and the generated admin password."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from backend.dispatch import NullDispatcher
from backend.main import create_app
from backend.migrate import upgrade
from backend.settings import Settings, SettingsError

REPO = Path(__file__).resolve().parents[2]


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PREFLOOP_")}


@pytest.mark.parametrize(
    ("var", "value", "message"),
    [
        ("PREFLOOP_PORT", "eighty", "PREFLOOP_PORT: Input should be a valid integer"),
        (
            "PREFLOOP_GOLD_FRACTION",
            "1.5",
            "PREFLOOP_GOLD_FRACTION: Input should be less than or equal to 1",
        ),
        ("PREFLOOP_DATABASE_URL", "mysql://x/y", "PREFLOOP_DATABASE_URL: only PostgreSQL"),
        ("PREFLOOP_SECRET_KEY", "short", "PREFLOOP_SECRET_KEY: must be at least 32 characters"),
    ],
)
def test_bad_setting_stops_startup_naming_the_variable(var, value, message):
    env = {**_clean_env(), var: value}
    proc = subprocess.run(
        [sys.executable, "-c", "from backend.settings import load_settings_or_exit as f; f()"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert message in proc.stderr


def test_cli_serve_without_admin_password_outside_local_mode_exits_naming_it():
    env = {**_clean_env(), "PREFLOOP_DATABASE_URL": "postgresql://u@127.0.0.1:1/none"}
    proc = subprocess.run(
        [sys.executable, "-m", "backend.cli", "serve"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "PREFLOOP_ADMIN_PASSWORD" in proc.stderr


def test_local_defaults(tmp_path, monkeypatch):
    for k in list(os.environ):
        if k.startswith("PREFLOOP_"):
            monkeypatch.delenv(k)
    s = Settings()
    assert s.is_local and s.signup_open
    assert s.db_url == "sqlite:///var/prefloop.db"
    # absolute, so that every process (whatever its working directory) uses one broker file
    assert s.celery_broker_url == f"sqla+sqlite:///{(Path('var') / 'broker.db').resolve()}"
    assert s.celery_result_backend.startswith("db+sqlite:///")
    assert s.images_dir == Path("var/images") and s.models_dir == Path("var/models")
    assert s.port == 8000 and s.admin_username == "admin" and s.gold_fraction == 0.1
    assert s.base_model == "builtin:shapes"
    pg = Settings(database_url="postgresql://u@h/db")
    assert pg.db_url == "postgresql+psycopg://u@h/db" and not pg.is_local and not pg.signup_open
    with pytest.raises(SettingsError, match="PREFLOOP_ADMIN_PASSWORD"):
        pg.require_server_secrets()


def test_secret_key_is_generated_once_and_persisted(tmp_path):
    s = Settings(data_dir=tmp_path)
    key = s.jwt_secret()
    assert len(key) >= 32 and (tmp_path / "secret_key").read_text() == key
    assert Settings(data_dir=tmp_path).jwt_secret() == key


def test_generated_admin_password_is_printed_once_and_works(tmp_path, capsys):
    settings = Settings(
        data_dir=tmp_path, argon2_time_cost=1, argon2_memory_kib=64, log_level="WARNING"
    )
    upgrade(settings.db_url)
    with TestClient(create_app(settings, NullDispatcher())) as client:
        out = capsys.readouterr().out
        lines = [ln for ln in out.splitlines() if "password:" in ln]
        assert len(lines) == 1
        password = lines[0].split("password:")[1].strip()
        assert len(password) >= 12
        r = client.post("/api/v1/auth/token", data={"username": "admin", "password": password})
        assert r.status_code == 200
    assert password not in (tmp_path / "prefloop.db").read_bytes().decode("latin-1")
    with TestClient(create_app(settings, NullDispatcher())) as client:
        out = capsys.readouterr().out
        assert "password:" not in out and password not in out
        r = client.post("/api/v1/auth/token", data={"username": "admin", "password": password})
        assert r.status_code == 200
