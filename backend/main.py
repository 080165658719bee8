"""The FastAPI app factory.

``create_app(settings=None, dispatcher=None)`` builds everything from settings (no global
engine): the database, password and token services, the image store, metrics, the login and
registration rate limiters (shared through Redis when configured), and the dispatcher (Celery by default; tests pass a recording one). Start-up (the
lifespan) configures logging and makes sure the admin account and the base model's version
exist; in local mode without a configured password, the admin password is generated then and
printed once to stdout.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from backend.api.errors import install_error_handlers
from backend.api.fallback import install_api_fallback
from backend.api.health import router as health_router
from backend.api.middleware import BodySizeLimitMiddleware, RequestContextMiddleware
from backend.api.openapi import install_openapi
from backend.api.routes import api_router
from backend.api.state import AppState, ImageSigner
from backend.db import Database
from backend.dispatch import CeleryDispatcher, Dispatcher
from backend.observability import Metrics, configure_logging
from backend.rate_limit import make_limiter
from backend.security import PasswordService, TokenService
from backend.services import users as user_service
from backend.services import versions as version_service
from backend.settings import Settings, get_settings
from backend.storage import artifact_store, image_store

log = logging.getLogger("prefloop")

#: ``pg_advisory_xact_lock`` key serialising start-up bootstrap across server processes.
BOOTSTRAP_LOCK_KEY = 0x50524546  # "PREF"

API_DESCRIPTION = """Prefloop's annotation and admin API (v1). Errors are JSON `{"detail": ...}`.
Annotators reach only their own endpoints (401 without a token, 403 on admin endpoints)."""


def build_state(settings: Settings, dispatcher: Dispatcher | None = None) -> AppState:
    settings.require_server_secrets()
    if settings.storage_is_local:
        settings.images_dir.mkdir(parents=True, exist_ok=True)
    settings.models_dir.mkdir(parents=True, exist_ok=True)
    secret = settings.jwt_secret()
    return AppState(
        settings=settings,
        db=Database.from_settings(settings),
        passwords=PasswordService(
            time_cost=settings.argon2_time_cost, memory_kib=settings.argon2_memory_kib
        ),
        tokens=TokenService(secret, settings.token_ttl_seconds),
        dispatcher=dispatcher if dispatcher is not None else CeleryDispatcher(settings),
        metrics=Metrics(),
        login_limiter=make_limiter(
            settings.rate_limit_redis_url,
            settings.login_rate_limit_attempts,
            settings.login_rate_limit_window_seconds,
            name="login",
        ),
        register_limiter=make_limiter(
            settings.rate_limit_redis_url,
            settings.register_rate_limit_attempts,
            settings.register_rate_limit_window_seconds,
            name="register",
        ),
        store=image_store(
            settings,
            cache_bytes=0 if settings.storage_is_local else settings.image_cache_mb << 20,
        ),
        artifacts=artifact_store(settings),
        signer=ImageSigner(secret),
    )


def bootstrap(state: AppState) -> str | None:
    """Ensure the admin account and the base version exist (one transaction). Returns the
    generated admin password when one was created (the caller shows it once).

    Several server processes (``uvicorn --workers N``) run this at the same time on a fresh
    database: on PostgreSQL a transaction-scoped advisory lock makes them take turns (the
    later ones then find the rows and change nothing); SQLite's ``BEGIN IMMEDIATE`` write
    session already serialises them."""
    with state.db.transaction() as session:
        if state.db.dialect == "postgresql":
            session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": BOOTSTRAP_LOCK_KEY})
        generated = user_service.ensure_admin(session, state.settings, state.passwords)
        version_service.ensure_base_version(session, state.settings.base_model)
    return generated


def announce_generated_password(username: str, password: str) -> None:
    print(
        f"\nPrefloop created the admin account.\n  username: {username}\n  password: {password}\n"
        "This password is shown once; it is stored hashed. Set PREFLOOP_ADMIN_PASSWORD to "
        "choose your own.\n",
        flush=True,
    )


def create_app(settings: Settings | None = None, dispatcher: Dispatcher | None = None) -> FastAPI:
    settings = settings or get_settings()
    state = build_state(settings, dispatcher)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_logging(settings.log_level, json_logs=settings.log_json)
        generated = await run_in_threadpool(bootstrap, state)
        if generated is not None:
            announce_generated_password(settings.admin_username, generated)
        log.info("prefloop API ready", extra={"local_mode": settings.is_local})
        try:
            yield
        finally:
            state.db.dispose()

    app = FastAPI(
        title="Prefloop",
        version="1.0.0",
        description=API_DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.prefloop = state
    install_error_handlers(app)
    app.include_router(api_router)
    app.include_router(health_router)
    install_api_fallback(app)  # after every API route, before any mount (the UI's)
    install_openapi(app)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_upload_bytes)
    app.add_middleware(RequestContextMiddleware, metrics=state.metrics)
    return app
