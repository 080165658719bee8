"""Celery tasks: each is one line that calls a service function, with ids as arguments.

Names and queues come from :mod:`backend.queues`; ``worker.celery_app`` imports this module in
every worker (``app.conf.imports``). The tasks are ``shared_task`` so that an app built by
:func:`worker.celery_app.create_celery` (tests, tools) gets them too.

- ``train.round`` (queue ``train``): :func:`worker.rounds.run_round`. ``acks_late`` with
  ``reject_on_worker_lost``: a worker killed mid-round leaves the message to be delivered
  again, and the round resumes from its checkpoint. Retried only on transient database errors
  (connection lost, lock timeout); never on other exceptions, which fail the round instead.
- ``pairs.generate`` (queue ``sample``: it samples the model, on its own workers so that
  the pool refills while a round trains): :func:`worker.pair_pool.refill_pool`. Beat
  sends it periodically; a failed run is simply replaced by the next one.
- ``rounds.sweep`` (queue ``cpu``): :func:`worker.round_schedule.sweep_and_schedule`, which re-queues rounds
  committed but never dispatched or orphaned, and starts scheduled rounds.
- ``ab.check`` (queue ``cpu``): :func:`backend.services.publishing.check_open_tests`, which records the
  first decision of every open A/B test and applies the publish policy (the API already
  checks a test after each of its votes; this catches what a crash or a busy database missed).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from typing import Any

from celery import Task, shared_task
from celery.signals import task_failure, worker_init
from sqlalchemy.exc import OperationalError

from backend.db import Database
from backend.dispatch import CeleryDispatcher
from backend.models import RoundStatus, TrainingRound
from backend.queues import AB_CHECK, GENERATE_PAIRS, SWEEP, TASK_QUEUES, TRAIN_ROUND
from backend.services import publishing
from backend.settings import Settings, get_settings
from worker import metrics, pair_pool, round_schedule, rounds

#: Transient errors worth retrying a task for: the database went away or stayed locked.
TRANSIENT_ERRORS = (OperationalError,)


@functools.cache
def _settings() -> Settings:
    return get_settings()


@functools.cache
def _database() -> Database:
    return Database.from_settings(_settings())


@functools.cache
def _dispatcher() -> CeleryDispatcher:
    return CeleryDispatcher(_settings())


@shared_task(
    name=TRAIN_ROUND,
    bind=True,
    queue=TASK_QUEUES[TRAIN_ROUND].value,
    acks_late=True,
    reject_on_worker_lost=True,
    autoretry_for=TRANSIENT_ERRORS,
    retry_backoff=10,
    retry_backoff_max=300,
    max_retries=5,
)
def train_round(self: Task, round_id: int) -> None:
    was_finished = _round_finished(round_id)
    rounds.run_round(round_id, _database().write_session, _settings(), task_id=self.request.id)
    if not was_finished:  # a re-delivered, already finished round is not counted again
        with _database().read_session() as session:
            row = session.get(TrainingRound, round_id)
            if row is not None:
                metrics.observe_round(row)


def _round_finished(round_id: int) -> bool:
    with _database().read_session() as session:
        row = session.get(TrainingRound, round_id)
        return row is not None and RoundStatus(row.status).finished


@shared_task(name=GENERATE_PAIRS, queue=TASK_QUEUES[GENERATE_PAIRS].value, acks_late=True)
def generate_pairs() -> int:
    started = time.monotonic()
    made = pair_pool.refill_pool(_database().write_session, _settings())
    metrics.refill_seconds.observe(time.monotonic() - started)
    metrics.pairs_sampled.inc(made)
    return made


@shared_task(name=SWEEP, queue=TASK_QUEUES[SWEEP].value, acks_late=True)
def sweep_rounds() -> dict[str, Any]:
    return round_schedule.sweep_and_schedule(_database().write_session, _settings(), _dispatcher())


@shared_task(name=AB_CHECK, queue=TASK_QUEUES[AB_CHECK].value, acks_late=True)
def check_ab_tests() -> list[dict[str, Any]]:
    results = publishing.check_open_tests(_database().write_session, _settings())
    for result in results:
        metrics.ab_decisions.labels(result.state).inc()
    return [vars(r) for r in results]


@worker_init.connect
def _serve_metrics(**_: Any) -> None:
    # Each worker serves its own /metrics when PREFLOOP_WORKER_METRICS_PORT is set. A prefork
    # worker's children share PROMETHEUS_MULTIPROC_DIR, emptied here, before they start.
    from backend.observability import MULTIPROC_ENV, prepare_multiprocess_dir

    if os.environ.get(MULTIPROC_ENV):
        prepare_multiprocess_dir(os.environ[MULTIPROC_ENV])
    port = _settings().worker_metrics_port
    try:
        metrics.start_server(port)
    except OSError as exc:  # the worker still works; say clearly why there are no metrics
        logging.getLogger(__name__).error(
            "worker metrics not served: cannot listen on port %s (%s); give each worker on "
            "this host its own PREFLOOP_WORKER_METRICS_PORT",
            port,
            exc,
        )


@task_failure.connect
def _count_failure(sender: Any = None, exception: BaseException | None = None, **_: Any) -> None:
    name = getattr(sender, "name", None) or "unknown"
    metrics.task_failures.labels(name, type(exception).__name__ if exception else "unknown").inc()
