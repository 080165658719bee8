"""``alembic upgrade head`` yields exactly the models' schema, on SQLite and PostgreSQL."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from backend.models import Base


def test_migrations_match_models(db_url):
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(
                conn, opts={"compare_type": True, "render_as_batch": db_url.startswith("sqlite")}
            )
            diff = compare_metadata(ctx, Base.metadata)
            tables = set(inspect(conn).get_table_names())
    finally:
        engine.dispose()
    assert diff == []
    assert {t.name for t in Base.metadata.sorted_tables} <= tables
    assert "alembic_version" in tables


def test_migrations_downgrade_and_upgrade_again(db_url):
    from alembic import command
    from sqlalchemy import text

    from backend.migrate import alembic_config

    cfg = alembic_config(db_url)
    command.downgrade(cfg, "base")
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            assert set(inspect(conn).get_table_names()) <= {"alembic_version"}
    finally:
        engine.dispose()
    command.upgrade(cfg, "head")
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0005"
    finally:
        engine.dispose()


def test_status_check_takes_shadow_banned_and_nothing_else(db_url):
    """0004: the widened ``users.status`` CHECK accepts ``shadow_banned``, still rejects junk."""
    import pytest
    from sqlalchemy import text
    from sqlalchemy.exc import IntegrityError

    engine = create_engine(db_url)
    insert = text(
        "INSERT INTO users (username, password_hash, role, status, token_version, created_at) "
        "VALUES (:u, 'x', 'annotator', :s, 0, CURRENT_TIMESTAMP)"
    )
    try:
        with engine.connect() as conn:
            trans = conn.begin()
            conn.execute(insert, {"u": "shadow-0004", "s": "shadow_banned"})
            with pytest.raises(IntegrityError):
                conn.execute(insert, {"u": "junk-0004", "s": "sleeping"})
            trans.rollback()
    finally:
        engine.dispose()
