"""``prefloop`` command line: ``serve``, ``migrate``, ``create-user`` (server side), and the
operator commands on the v1 HTTP client (``login``, ``rounds``, ``versions``, ``users``,
``prompts``, ``export``, ``import``: :mod:`prefloop_client.cli`).

``prefloop serve`` in local mode (SQLite) upgrades the database first, so one command starts
everything; with PostgreSQL run ``prefloop migrate`` as a deploy step. The admin account and
base version are ensured once in this process before the server starts (so several workers
never race to create them), and a generated admin password is printed here, once.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import sys
from typing import Any

from backend.settings import Settings, load_settings_or_exit

log = logging.getLogger("prefloop.cli")


def serving_app() -> Any:
    """The ASGI app ``serve`` runs (a uvicorn factory): the API, plus the Gradio UI at ``/``
    when the ``ui`` package provides ``ui.app.build_ui(api_base_url)``."""
    from backend.main import create_app

    settings = load_settings_or_exit(require_secrets=True)
    app = create_app(settings)
    try:
        from ui.app import build_ui  # type: ignore[import-not-found]
    except ImportError as exc:
        log.warning("annotation UI not mounted: ui.app.build_ui is not available (%s)", exc)
        return app
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("GRADIO_TEMP_DIR", str(settings.data_dir / "gradio"))
    import gradio as gr

    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    demo = build_ui(f"http://{host}:{settings.port}")
    return gr.mount_gradio_app(app, demo, path="/")


def _migrate(settings: Settings) -> None:
    from backend.migrate import upgrade

    upgrade(settings.db_url)


def cmd_migrate(args: argparse.Namespace) -> int:
    from sqlalchemy.exc import OperationalError

    settings = load_settings_or_exit()
    try:
        _migrate(settings)
    except OperationalError as exc:
        print(f"prefloop: cannot reach the database: {exc.orig}", file=sys.stderr)
        return 1
    print(f"database at head: {settings.db_url.split('@')[-1]}")
    return 0


def proxy_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's proxy-header options: ``X-Forwarded-For`` is believed only from
    ``PREFLOOP_TRUSTED_PROXIES`` (uvicorn's own default trusts 127.0.0.1, so any local
    process or same-host proxy could pick its client address)."""
    trusted = settings.trusted_proxy_list
    return {"proxy_headers": bool(trusted), "forwarded_allow_ips": trusted or []}


def _prepare_metrics(settings: Settings, workers: int) -> None:
    """Several server processes: prometheus_client's multiprocess mode, so that ``/metrics``
    counts every process's requests whichever answers (backend/observability.py). The
    directory is ``PROMETHEUS_MULTIPROC_DIR`` when set, else ``<data_dir>/prometheus``; it is
    emptied here, before the processes start, and set for them (they inherit the variable)."""
    from backend.observability import MULTIPROC_ENV, prepare_multiprocess_dir

    configured = os.environ.get(MULTIPROC_ENV)
    if workers > 1 or configured:
        os.environ[MULTIPROC_ENV] = prepare_multiprocess_dir(
            configured or settings.data_dir / "prometheus"
        )
        log.info("metrics: multiprocess mode in %s", os.environ[MULTIPROC_ENV])


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from backend.main import announce_generated_password, bootstrap, build_state
    from backend.observability import configure_logging

    settings = load_settings_or_exit(require_secrets=True)
    configure_logging(settings.log_level, json_logs=settings.log_json)
    if settings.is_local and not args.no_migrate:
        _migrate(settings)
    from backend.dispatch import NullDispatcher

    state = build_state(settings, NullDispatcher())
    generated = bootstrap(state)
    state.db.dispose()
    if generated is not None:
        announce_generated_password(settings.admin_username, generated)
    _prepare_metrics(settings, args.workers)
    uvicorn.run(
        "backend.cli:serving_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=args.workers,
        log_config=None,
        access_log=False,
        **proxy_options(settings),
    )
    return 0


def cmd_create_user(args: argparse.Namespace) -> int:
    from backend.db import Database
    from backend.models import UserRole
    from backend.security import PasswordService
    from backend.services import users as user_service
    from backend.services.errors import ServiceError

    settings = load_settings_or_exit()
    password = args.password or getpass.getpass("password: ")
    if len(password) < 8:
        print("password must have at least 8 characters", file=sys.stderr)
        return 2
    db = Database.from_settings(settings)
    passwords = PasswordService(
        time_cost=settings.argon2_time_cost, memory_kib=settings.argon2_memory_kib
    )
    try:
        with db.transaction() as session:
            user = user_service.create_user(
                session,
                passwords,
                username=args.username,
                password=password,
                role=UserRole(args.role),
            )
            print(f"created {user.role.value} {user.username!r} (id {user.id})")
    except ServiceError as exc:
        print(exc.detail, file=sys.stderr)
        return 1
    finally:
        db.dispose()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="prefloop",
        description="Prefloop: run the server (serve, migrate, create-user) and operate it "
        "over its v1 HTTP API (login, rounds, versions, users, prompts, export, import).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the API (and the UI when installed)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--no-migrate", action="store_true", help="skip the local-mode auto-migrate")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("migrate", help="alembic upgrade head")
    p.set_defaults(func=cmd_migrate)
    p = sub.add_parser("create-user", help="create an account")
    p.add_argument("username")
    p.add_argument("--password", help="read from a prompt when omitted")
    p.add_argument("--role", choices=["annotator", "admin"], default="annotator")
    p.set_defaults(func=cmd_create_user)
    from prefloop_client.cli import add_commands

    add_commands(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
