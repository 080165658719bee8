"""The workers' Prometheus metrics, and the endpoint that serves them.

Each worker serves its own ``/metrics`` on ``PREFLOOP_WORKER_METRICS_PORT`` (unset: none),
started when the worker starts (Celery's ``worker_init``). A solo-pool worker runs its tasks in
that process; a prefork worker's children write to ``PROMETHEUS_MULTIPROC_DIR`` (set it, one
directory per worker) and the endpoint sums them. The loop's shared state (pool size, queue
depths, rounds, A/B decisions) is on the API's ``/metrics`` (backend/observability.py), read at
scrape time; docs/scaling.md has the PromQL for the operator's panels.

- ``prefloop_pairs_sampled_total``: pairs added to the pool (fill rate: its ``rate``);
- ``prefloop_pool_refill_seconds``: duration of each ``pairs.generate``;
- ``prefloop_round_duration_seconds{status}``: a round's wall time, started to finished;
- ``prefloop_round_steps_total`` and ``prefloop_round_train_seconds_total``: optimizer steps
  and the time they took (steps/s: the ratio of their rates); ``prefloop_round_steps_per_second``
  the last round's;
- ``prefloop_rounds_finished_total{status}``;
- ``prefloop_ab_decisions_total{decision}``: decisions the ``ab.check`` safety net made (most
  are made by the API after a vote: the API's ``prefloop_ab_tests{state}`` counts them all);
- ``prefloop_task_failures_total{task,reason}`` and ``prefloop_round_failures_total{reason}``.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

log = logging.getLogger(__name__)

pairs_sampled = Counter("prefloop_pairs_sampled_total", "Pairs added to the pool by refills.")
refill_seconds = Histogram(
    "prefloop_pool_refill_seconds",
    "Duration of each pool refill (pairs.generate).",
    buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
round_seconds = Histogram(
    "prefloop_round_duration_seconds",
    "Wall time of a training round, from its start to its end, by final status.",
    ["status"],
    buckets=(10, 30, 60, 300, 900, 1800, 3600, 7200, 14400, 43200),
)
round_steps = Counter("prefloop_round_steps_total", "Optimizer steps trained by rounds.")
round_train_seconds = Counter(
    "prefloop_round_train_seconds_total", "Wall time of the rounds whose steps are counted."
)
round_steps_per_second = Gauge(
    "prefloop_round_steps_per_second",
    "Steps per second of the last round this worker finished.",
    multiprocess_mode="mostrecent",
)
rounds_finished = Counter(
    "prefloop_rounds_finished_total", "Rounds this worker took to a final status.", ["status"]
)
round_failures = Counter("prefloop_round_failures_total", "Failed rounds by reason.", ["reason"])
ab_decisions = Counter(
    "prefloop_ab_decisions_total", "A/B decisions made by the ab.check task.", ["decision"]
)
task_failures = Counter(
    "prefloop_task_failures_total",
    "Celery tasks that raised, by task and exception.",
    ["task", "reason"],
)

_EXCEPTION = re.compile(r"^([A-Za-z_][A-Za-z0-9_.]*(?:Error|Exception|Exit|Interrupt))\b")


def failure_reason(error: str | None) -> str:
    """A bounded label for a round's stored error: ``diverged``, the exception's class name,
    or ``failed`` (a :class:`~worker.rounds.RoundFailed` with its own message)."""
    text = (error or "").strip()
    if text.startswith("training diverged"):
        return "diverged"
    match = _EXCEPTION.match(text)
    return match.group(1).rsplit(".", 1)[-1][:64] if match else "failed"


def observe_round(row: Any) -> None:
    """Record a round the worker just ran, from its row (status, step, started/finished)."""
    status = str(getattr(row.status, "value", row.status))
    if status not in ("succeeded", "failed", "cancelled"):
        return  # left running for a retry
    rounds_finished.labels(status).inc()
    if status == "failed":
        round_failures.labels(failure_reason(row.error)).inc()
    if row.started_at is not None and row.finished_at is not None:
        seconds = max((row.finished_at - row.started_at).total_seconds(), 0.0)
        round_seconds.labels(status).observe(seconds)
        if row.step and seconds > 0:
            round_steps.inc(row.step)
            round_train_seconds.inc(seconds)
            round_steps_per_second.set(row.step / seconds)


def metrics_registry() -> CollectorRegistry:
    """This process's registry, or all processes' in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return registry
    return REGISTRY


def start_server(port: int | None, addr: str = "0.0.0.0") -> bool:
    """Serve ``/metrics`` on ``port`` in a daemon thread (no-op when ``port`` is falsy)."""
    if not port:
        return False
    from prometheus_client import start_http_server

    start_http_server(int(port), addr=addr, registry=metrics_registry())
    log.info("worker metrics on :%s/metrics", port)
    return True


__all__ = [
    "ab_decisions",
    "failure_reason",
    "observe_round",
    "pairs_sampled",
    "refill_seconds",
    "start_server",
    "task_failures",
]
