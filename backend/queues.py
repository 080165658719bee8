"""Celery queue and task names, and the broker URLs: the one place the API and the workers read them.

This module imports neither torch nor Celery, so the API (which sends tasks by name, see
:mod:`backend.dispatch`) and the workers (:mod:`worker.celery_app`, :mod:`worker.tasks`) share
it without the API depending on the worker package.

One queue per kind of work, so that each pool scales apart and annotators never wait on a round:

- :attr:`Queue.SAMPLE`: sampling the images of new pairs, A/B evaluation pairs included
  (``pairs.generate``). Short tasks (one refill); a sampling worker keeps the pool full while
  another worker trains. Runs the model: GPU workers, concurrency 1 per process.
- :attr:`Queue.TRAIN`: training a round (``train.round``), which also renders its validation
  grid and judges its candidate. Long tasks (minutes to hours); one per GPU worker process.
- :attr:`Queue.CPU`: bookkeeping that never loads a model (the sweeper, the A/B check).

Both model queues may be consumed on one GPU host, by two worker processes sharing the GPU
(README, "Scaling out"), or by one process with ``-Q sample,train`` (then a round blocks refills
for as long as it trains: the layout this split replaces).

Tasks have explicit names, never the Python path Celery would derive, so that moving a function
does not orphan the messages already queued under its old name.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path


class Queue(StrEnum):
    """The Celery queues; the value is the queue name on the broker."""

    SAMPLE = "sample"
    TRAIN = "train"
    CPU = "cpu"


#: Train one round on the accumulated pairs and publish a candidate version (args: round_id).
TRAIN_ROUND = "train.round"
#: Refill the pool of ready pairs from the published version(s) (no args).
GENERATE_PAIRS = "pairs.generate"
#: Re-queue rounds committed to the database but never dispatched, or orphaned (no args).
SWEEP = "rounds.sweep"
#: Check every open A/B test's decision and act on it (no args; the API also checks a test
#: right after each of its votes, so this is the safety net).
AB_CHECK = "ab.check"

#: Which queue each task goes to. Anything not listed goes to the default queue, CPU.
TASK_QUEUES: dict[str, Queue] = {
    TRAIN_ROUND: Queue.TRAIN,
    GENERATE_PAIRS: Queue.SAMPLE,
    SWEEP: Queue.CPU,
    AB_CHECK: Queue.CPU,
}

DEFAULT_QUEUE = Queue.CPU

#: ``celery worker -Q`` for one process that consumes every queue (tests, benches): a round then
#: blocks pool refills for as long as it trains.
ALL_QUEUES = ",".join(q.value for q in Queue)
#: One machine, two worker processes (``make demo``): ``-Q`` of each, by name. The sampling
#: worker takes the bookkeeping too; together they consume every queue.
LOCAL_WORKERS: dict[str, str] = {
    "worker-sample": f"{Queue.SAMPLE},{Queue.CPU}",
    "worker-train": Queue.TRAIN.value,
}


def broker_url(configured: str | None, data_dir: str | Path) -> str:
    """The Celery broker URL: ``configured``, else the embedded SQLite broker in ``data_dir``."""
    if configured:
        return str(configured)
    return f"sqla+sqlite:///{Path(data_dir).expanduser().resolve() / 'broker.db'}"


def result_backend_url(configured: str | None, data_dir: str | Path) -> str:
    """The Celery result backend URL: ``configured``, else SQLite in ``data_dir``."""
    if configured:
        return str(configured)
    return f"db+sqlite:///{Path(data_dir).expanduser().resolve() / 'results.db'}"


def queue_depths(url: str, queues: list[str] | None = None) -> dict[str, int]:
    """Messages waiting on each queue of the broker at ``url`` (by default every :class:`Queue`).

    Redis: kombu keeps one list per queue and priority (``name``, then ``name\\x06\\x16<p>``);
    the embedded SQLAlchemy broker: visible rows of ``kombu_message``. Raises on an unreachable
    broker or an unknown scheme; the caller decides what a failed read means.
    """
    names = queues if queues is not None else [q.value for q in Queue]
    if url.startswith(("redis://", "rediss://", "redis+socket://")):
        import redis

        client = redis.Redis.from_url(url.replace("redis+socket://", "unix://", 1))
        try:
            out = {}
            for name in names:
                keys = [name, *(f"{name}\x06\x16{p}" for p in range(1, 10))]
                with client.pipeline(transaction=False) as pipe:
                    for key in keys:
                        pipe.llen(key)
                    out[name] = int(sum(pipe.execute()))
            return out
        finally:
            client.close()
    for prefix in ("sqla+", "sqlalchemy+"):
        if url.startswith(prefix):
            from sqlalchemy import create_engine, inspect, text

            engine = create_engine(url[len(prefix) :])
            try:
                with engine.connect() as conn:
                    if not inspect(conn).has_table("kombu_message"):
                        return dict.fromkeys(names, 0)  # no message sent yet
                    rows = conn.execute(
                        text(
                            "SELECT q.name, COUNT(m.id) FROM kombu_queue q "
                            "LEFT JOIN kombu_message m ON m.queue_id = q.id AND m.visible "
                            "GROUP BY q.name"
                        )
                    ).all()
            finally:
                engine.dispose()
            found = {str(name): int(n) for name, n in rows}
            return {name: found.get(name, 0) for name in names}
    raise ValueError(f"cannot read queue depths from broker {url.split('://')[0]}://")


__all__ = [
    "AB_CHECK",
    "ALL_QUEUES",
    "DEFAULT_QUEUE",
    "GENERATE_PAIRS",
    "LOCAL_WORKERS",
    "SWEEP",
    "TASK_QUEUES",
    "TRAIN_ROUND",
    "Queue",
    "broker_url",
    "queue_depths",
    "result_backend_url",
]
