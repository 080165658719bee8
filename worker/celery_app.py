"""The Celery application: broker, routing and reliability settings, and the beat schedule.

``celery -A worker.celery_app worker -Q train`` (and ``-Q sample``, ``-Q cpu``, ``beat``; queue
names in :mod:`backend.queues`) load the module-level
``app``, built from :func:`backend.settings.get_settings` on first access and cached. Building it
opens no connection, to the broker or to the database: Celery connects lazily, on the first send
or when a worker starts. Tests and tools build their own with :func:`create_celery`.

Two brokers share this code:

- Redis (``PREFLOOP_BROKER_URL=redis://...``), the ``docker compose`` stack;
- kombu's SQLAlchemy transport over SQLite (``sqla+sqlite:///<data dir>/broker.db``), the
  embedded default when no broker URL is set: one machine, no server to run.

The SQLAlchemy transport polls the database (every 1 s by default). Its interval is set on the
transport class, not through ``broker_transport_options``: kombu passes every transport option
to ``sqlalchemy.create_engine``, which rejects ``polling_interval``.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any

from celery import Celery
from kombu.transport import sqlalchemy as kombu_sqlalchemy

from backend.queues import (
    AB_CHECK,
    DEFAULT_QUEUE,
    GENERATE_PAIRS,
    SWEEP,
    TASK_QUEUES,
    broker_url,
    result_backend_url,
)

#: How often the embedded (SQLAlchemy) broker is polled for new messages, in seconds.
DEFAULT_SQLA_POLLING_INTERVAL_S = 0.2
#: Redis re-delivers an unacknowledged message after this long. With ``acks_late`` a training
#: round is acknowledged only when it ends, so this must exceed the longest round, or a second
#: worker would start the same round while the first is still running.
REDIS_VISIBILITY_TIMEOUT_S = 12 * 60 * 60
#: Beat periods, in seconds.
SWEEP_EVERY_S = 60.0
REFILL_PAIRS_EVERY_S = 30.0
AB_CHECK_EVERY_S = 30.0
#: The module holding the task functions; imported by workers only once it exists.
TASKS_MODULE = "worker.tasks"

_SQLA_SCHEMES = ("sqla+", "sqlalchemy+")
_REDIS_SCHEMES = ("redis://", "rediss://", "redis+socket://")


def _data_dir(settings: Any) -> Path:
    return Path(getattr(settings, "data_dir", None) or "var").expanduser().resolve()


def broker_url_for(settings: Any) -> str:
    """The broker URL: the configured one, else the embedded SQLite broker in the data dir
    (derived by :func:`backend.queues.broker_url`, as the API's)."""
    return broker_url(getattr(settings, "broker_url", None), _data_dir(settings))


def result_backend_for(settings: Any) -> str:
    """The result backend URL: the configured one, else SQLite in the data dir."""
    return result_backend_url(getattr(settings, "result_backend", None), _data_dir(settings))


def is_sqla_broker(url: str) -> bool:
    return url.startswith(_SQLA_SCHEMES)


def is_redis_broker(url: str) -> bool:
    return url.startswith(_REDIS_SCHEMES)


def create_celery(settings: Any | None = None, *, main: str = "prefloop") -> Celery:
    """Build the Celery app from ``settings`` (default: :func:`backend.settings.get_settings`).

    ``settings`` is a :class:`backend.settings.Settings` or any object with ``data_dir`` and
    ``broker_url`` / ``result_backend`` (empty: the embedded SQLite defaults in ``data_dir``);
    ``broker_polling_interval`` (seconds, embedded broker only) is read when present.
    Nothing here connects to the broker, the result backend or the database; the data dir is
    created, since the embedded broker and beat's schedule file live there.
    """
    if settings is None:
        from backend.settings import get_settings

        settings = get_settings()

    data_dir = _data_dir(settings)
    data_dir.mkdir(parents=True, exist_ok=True)
    broker_url = broker_url_for(settings)
    app = Celery(main, broker=broker_url, backend=result_backend_for(settings))

    broker_transport_options: dict[str, Any] = {}
    if is_sqla_broker(broker_url):
        interval = getattr(settings, "broker_polling_interval", None)
        # Process-wide: the transport class is shared by every app in the process.
        kombu_sqlalchemy.Transport.polling_interval = float(
            interval if interval is not None else DEFAULT_SQLA_POLLING_INTERVAL_S
        )
    elif is_redis_broker(broker_url):
        broker_transport_options["visibility_timeout"] = REDIS_VISIBILITY_TIMEOUT_S

    app.conf.update(
        # Reliability: a task is acknowledged only once it has run, and re-queued if the worker
        # process running it dies; a worker holds one message at a time.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # With acks_late, a task still running when the broker connection drops is re-delivered;
        # cancelling it avoids running it twice at once.
        worker_cancel_long_running_tasks_on_connection_loss=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options=broker_transport_options,
        # Tasks take ids, never objects.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_track_started=True,
        result_expires=24 * 60 * 60,
        timezone="UTC",
        enable_utc=True,
        # Routing: one queue per kind of work.
        task_default_queue=DEFAULT_QUEUE.value,
        task_routes={name: {"queue": queue.value} for name, queue in TASK_QUEUES.items()},
        # Periodic work. Each entry expires after one period, so a busy queue never piles up
        # stale copies of the same idempotent job.
        beat_schedule={
            "sweep-rounds": {
                "task": SWEEP,
                "schedule": SWEEP_EVERY_S,
                "options": {"expires": SWEEP_EVERY_S},
            },
            "refill-pair-pool": {
                "task": GENERATE_PAIRS,
                "schedule": REFILL_PAIRS_EVERY_S,
                "options": {"expires": REFILL_PAIRS_EVERY_S},
            },
            "check-ab-tests": {
                "task": AB_CHECK,
                "schedule": AB_CHECK_EVERY_S,
                "options": {"expires": AB_CHECK_EVERY_S},
            },
        },
        beat_schedule_filename=str(data_dir / "celerybeat-schedule"),
    )
    if importlib.util.find_spec(TASKS_MODULE) is not None:
        app.conf.imports = (TASKS_MODULE,)
    return app


@functools.cache
def _default_app() -> Celery:
    return create_celery()


def __getattr__(name: str) -> Any:
    # ``app`` is built on first access (``celery -A worker.celery_app``, ``from worker.celery_app
    # import app``), from the process's settings, so that importing this module for
    # :func:`create_celery` alone needs no configuration.
    if name == "app":
        return _default_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["broker_url_for", "create_celery", "result_backend_for"]
