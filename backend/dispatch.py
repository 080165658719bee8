"""Hands committed training rounds to the workers.

Handlers call the dispatcher only *after* the round's row is committed, so a worker never
sees an id that is not in the database. A round whose dispatch failed stays ``queued`` and
the worker's periodic sweeper re-sends it. ``app.state.dispatcher`` holds the instance; tests
inject a recording one.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from backend.queues import TASK_QUEUES, TRAIN_ROUND
from backend.settings import Settings

log = logging.getLogger(__name__)


class Dispatcher(Protocol):
    def dispatch_round(self, round_id: int) -> str | None:
        """Queue the round; return the task id when there is one."""
        ...

    def cancel_round(self, round_id: int, task_id: str | None) -> None:
        """Best effort: tell the workers to drop the round (they also re-check its status)."""
        ...


class NullDispatcher:
    """Dispatches nothing (rounds stay queued for the sweeper)."""

    def dispatch_round(self, round_id: int) -> str | None:
        log.info("round %s queued; no dispatcher configured", round_id)
        return None

    def cancel_round(self, round_id: int, task_id: str | None) -> None:
        return None


class CeleryDispatcher:
    """Sends ``train.round`` to its queue on the configured broker, by name.

    The backend does not import the worker package: the task and queue names come from
    :mod:`backend.queues`, which the workers read too.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._app: Any = None

    def _celery(self) -> Any:
        if self._app is None:
            from celery import Celery

            self._app = Celery(
                "prefloop-api",
                broker=self._settings.celery_broker_url,
                backend=self._settings.celery_result_backend,
            )
        return self._app

    def dispatch_round(self, round_id: int) -> str | None:
        result = self._celery().send_task(
            TRAIN_ROUND, args=[round_id], queue=TASK_QUEUES[TRAIN_ROUND].value
        )
        return str(result.id)

    def cancel_round(self, round_id: int, task_id: str | None) -> None:
        if task_id:
            self._celery().control.revoke(task_id)
