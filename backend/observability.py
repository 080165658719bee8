"""Structured logs (one JSON object per line, with the request id) and Prometheus metrics.

Metrics live in a per-app :class:`~prometheus_client.CollectorRegistry`, so several apps in
one process (tests) do not collide. Route labels are the route *templates*
(``/api/v1/rounds/{round_id}``), never raw paths, so cardinality stays bounded.

Several server processes (``prefloop serve --workers N``): with ``PROMETHEUS_MULTIPROC_DIR``
set (``serve`` sets it for N > 1), prometheus_client keeps every process's counters and
histograms in memory-mapped files there, and ``/metrics`` (:func:`render_metrics`) sums them,
whichever process answers. The loop's state (pool size, queue depths, rounds, A/B decisions)
is read from the database and the broker at scrape time (:class:`LoopStateCollector`), so it
is the same from every process. The workers' own metrics (``worker/metrics.py``) are served by
each worker (``PREFLOOP_WORKER_METRICS_PORT``); docs/scaling.md has the PromQL.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "request_id", default=None
)

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "msg", "request_id", ...extra fields}``."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = request_id_var.get()
        if rid:
            out["request_id"] = rid
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(level: str = "INFO", *, json_logs: bool = True) -> None:
    """Route the root logger to stderr, as JSON lines or plain text. Idempotent."""
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name("prefloop")
    if json_logs:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.handlers = [h for h in root.handlers if h.get_name() != "prefloop"] + [handler]
    root.setLevel(level)
    for name in (
        "uvicorn.access",
        "httpx",
        "httpx2",
        "httpcore",
    ):  # our middleware logs each request itself
        logging.getLogger(name).setLevel(logging.WARNING)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "prefloop_http_requests_total",
            "HTTP requests by method, route template and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "prefloop_http_request_duration_seconds",
            "HTTP request latency by method and route template.",
            ["method", "route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.votes = Counter(
            "prefloop_votes_total",
            "Votes stored (first submissions only).",
            ["choice"],
            registry=self.registry,
        )
        self.pairs_served = Counter(
            "prefloop_pairs_served_total",
            "Pairs served by GET /pairs/next.",
            ["kind"],
            registry=self.registry,
        )
        # ``labels(...)`` takes a lock and builds a key on every call; the label sets are
        # few and bounded (route templates, status codes, choices), so keep the children.
        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self._child(self.requests, method, route, str(status)).inc()
        self._child(self.latency, method, route).observe(seconds)

    def vote_stored(self, choice: str) -> None:
        self._child(self.votes, choice).inc()

    def pair_served(self, kind: str) -> None:
        self._child(self.pairs_served, kind).inc()


#: Where prometheus_client's multiprocess mode keeps its files (read by prometheus_client itself).
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class LoopStateCollector:
    """Gauges read at scrape time from the shared state, identical from every process:

    - ``prefloop_pool_ready_pairs``: pairs ready to serve (:func:`backend.services.pool.count_ready`);
    - ``prefloop_queue_depth{queue}``: messages waiting on each Celery queue;
    - ``prefloop_rounds{status}``: training rounds by status;
    - ``prefloop_ab_tests{state}``: A/B tests by state (each decision moves one out of ``open``).

    A family whose source cannot be read is left out of that scrape (and logged), so the rest
    of ``/metrics`` still answers; ``prefloop_state_read_ok{source}`` says which.
    """

    def __init__(self, session_factory: Callable[[], Any], settings: Any) -> None:
        self._session_factory = session_factory
        self._settings = settings

    def describe(self) -> list[Any]:
        return []  # collected on demand only: registering must not query anything

    def collect(self) -> Iterator[Any]:
        ok = GaugeMetricFamily(
            "prefloop_state_read_ok",
            "1 when the source of the loop's state gauges was read in this scrape.",
            labels=["source"],
        )
        try:
            yield from self._database_families()
            ok.add_metric(["database"], 1)
        except Exception:  # noqa: BLE001 - a scrape must not fail on one source
            logging.getLogger(__name__).warning("metrics: database state unreadable", exc_info=True)
            ok.add_metric(["database"], 0)
        try:
            yield self._queue_family()
            ok.add_metric(["broker"], 1)
        except Exception:  # noqa: BLE001
            logging.getLogger(__name__).warning("metrics: queue depths unreadable", exc_info=True)
            ok.add_metric(["broker"], 0)
        yield ok

    def _database_families(self) -> Iterator[Any]:
        from sqlalchemy import func, select

        from backend.models import ABTest, TrainingRound
        from backend.services.pool import count_ready

        with self._session_factory() as session:
            ready = count_ready(session, self._settings.pair_overlap)
            rounds = session.execute(
                select(TrainingRound.status, func.count()).group_by(TrainingRound.status)
            ).all()
            tests = session.execute(select(ABTest.state, func.count()).group_by(ABTest.state)).all()
        pool = GaugeMetricFamily(
            "prefloop_pool_ready_pairs", "Pairs in the pool ready to be served."
        )
        pool.add_metric([], ready)
        target = GaugeMetricFamily(
            "prefloop_pool_target_pairs", "The pool size the sampling workers refill to."
        )
        target.add_metric([], self._settings.pair_pool_target)
        by_status = GaugeMetricFamily(
            "prefloop_rounds", "Training rounds by status.", labels=["status"]
        )
        for status, n in rounds:
            by_status.add_metric([str(getattr(status, "value", status))], n)
        by_state = GaugeMetricFamily(
            "prefloop_ab_tests", "A/B tests by state (decisions leave 'open').", labels=["state"]
        )
        for state, n in tests:
            by_state.add_metric([str(getattr(state, "value", state))], n)
        yield from (pool, target, by_status, by_state)

    def _queue_family(self) -> Any:
        from backend.queues import queue_depths

        depths = queue_depths(self._settings.celery_broker_url)
        family = GaugeMetricFamily(
            "prefloop_queue_depth", "Messages waiting on each Celery queue.", labels=["queue"]
        )
        for name, n in depths.items():
            family.add_metric([name], n)
        return family


def render_metrics(metrics: Metrics, state_collector: Any | None = None) -> tuple[bytes, str]:
    """The ``/metrics`` body and content type: this process's registry, or, in multiprocess
    mode, every server process's counters summed from ``PROMETHEUS_MULTIPROC_DIR``; plus the
    loop's state gauges."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = metrics.registry
    body = generate_latest(registry)
    if state_collector is not None:
        extra = CollectorRegistry()
        extra.register(state_collector)
        body += generate_latest(extra)
    return body, CONTENT_TYPE_LATEST


def prepare_multiprocess_dir(path: str | os.PathLike[str]) -> str:
    """Create ``path`` and empty it (files of dead processes would be summed forever); returns
    it as a string for ``PROMETHEUS_MULTIPROC_DIR``. Call it once, before the processes start."""
    from pathlib import Path

    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink(missing_ok=True)
    return str(directory)
