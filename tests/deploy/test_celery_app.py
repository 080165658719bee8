"""worker/celery_app.py: its configuration, and real worker round trips on both brokers.

The round trips start a real ``celery worker --pool=solo`` subprocess and send it a task from
this process:

- Redis at 127.0.0.1:6379, database 15, every key under a per-run prefix;
- the embedded broker (kombu's SQLAlchemy transport on SQLite) in a temporary directory;
- the production module itself (``celery -A worker.celery_app``, settings from ``PREFLOOP_*``)
  on the embedded broker, answering Celery's built-in ``celery.accumulate``.

Each worker is terminated in a ``finally``, whatever the test's outcome.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NoReturn

import pytest
import redis
from celery import Celery
from celery.result import AsyncResult
from kombu.transport import sqlalchemy as kombu_sqlalchemy

from backend.queues import (
    AB_CHECK,
    ALL_QUEUES,
    GENERATE_PAIRS,
    SWEEP,
    TASK_QUEUES,
    TRAIN_ROUND,
    Queue,
)
from backend.settings import Settings
from worker import celery_app as celery_module
from worker.celery_app import (
    DEFAULT_SQLA_POLLING_INTERVAL_S,
    REDIS_VISIBILITY_TIMEOUT_S,
    broker_url_for,
    create_celery,
    result_backend_for,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
REDIS_URL = "redis://127.0.0.1:6379/15"
PING_TASK = "deploy.ping"  # tests/deploy/ping_app.py
RESULT_TIMEOUT_S = 30.0


def embedded(tmp_path: Path, **extra: Any) -> SimpleNamespace:
    return SimpleNamespace(broker_url=None, result_backend=None, data_dir=tmp_path, **extra)


@pytest.fixture(autouse=True)
def _restore_sqla_polling_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    # create_celery sets it on the transport class, process-wide; undo that after each test.
    monkeypatch.setattr(
        kombu_sqlalchemy.Transport, "polling_interval", kombu_sqlalchemy.Transport.polling_interval
    )


@pytest.fixture
def redis_broker(unavailable: Callable[[str], NoReturn]) -> str:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        unavailable(f"Redis is not reachable at {REDIS_URL}: {exc}")
    return REDIS_URL


# --- configuration -----------------------------------------------------------------------------


def test_reliability_and_serialisation(tmp_path: Path) -> None:
    conf = create_celery(embedded(tmp_path)).conf
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.task_serializer == conf.result_serializer == "json"
    assert list(conf.accept_content) == ["json"]
    assert conf.task_default_queue == Queue.CPU.value == "cpu"


def test_routes_send_each_task_to_its_queue(tmp_path: Path) -> None:
    app = create_celery(embedded(tmp_path))
    expected = {TRAIN_ROUND: "train", GENERATE_PAIRS: "sample", SWEEP: "cpu", AB_CHECK: "cpu"}
    assert {name: queue.value for name, queue in TASK_QUEUES.items()} == expected
    for name, queue in expected.items():
        assert app.amqp.router.route({}, name)["queue"].name == queue, name
    assert app.amqp.router.route({}, "anything.else")["queue"].name == "cpu"


def test_task_names_and_queues_are_stable() -> None:
    assert (TRAIN_ROUND, GENERATE_PAIRS, SWEEP, AB_CHECK) == (
        "train.round",
        "pairs.generate",
        "rounds.sweep",
        "ab.check",
    )
    assert [q.value for q in Queue] == ["sample", "train", "cpu"]
    assert Queue("train") is Queue.TRAIN and Queue.CPU == "cpu"
    assert ALL_QUEUES == "sample,train,cpu"


def test_api_dispatcher_uses_the_same_names(tmp_path: Path) -> None:
    # The backend sends by name without importing the worker package; what it sends must be
    # what the workers register and consume.
    from backend.dispatch import CeleryDispatcher

    sent: list[tuple[str, list[Any], str]] = []

    class Recorder:
        def send_task(self, name: str, args: list[Any], queue: str) -> Any:
            sent.append((name, args, queue))
            return SimpleNamespace(id="t-1")

    dispatcher = CeleryDispatcher(Settings.model_validate({"data_dir": tmp_path}))
    dispatcher._app = Recorder()
    assert dispatcher.dispatch_round(7) == "t-1"
    assert sent == [(TRAIN_ROUND, [7], TASK_QUEUES[TRAIN_ROUND].value)]

    app = create_celery(embedded(tmp_path))
    app.loader.import_default_modules()
    for name, queue in TASK_QUEUES.items():
        assert app.tasks[name].queue == queue.value, name
        assert app.amqp.router.route({}, name)["queue"].name == queue.value


def test_names_module_is_torch_and_celery_free() -> None:
    # The API imports it; it must not pull the worker's dependencies.
    code = (
        "import sys, backend.queues, backend.dispatch\n"
        "bad = [m for m in ('torch', 'celery', 'diffusers', 'worker') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2]
    )


def test_beat_schedule(tmp_path: Path) -> None:
    conf = create_celery(embedded(tmp_path)).conf
    by_task = {entry["task"]: entry for entry in conf.beat_schedule.values()}
    assert set(by_task) == {SWEEP, GENERATE_PAIRS, AB_CHECK}
    assert by_task[SWEEP]["schedule"] == 60.0
    assert by_task[GENERATE_PAIRS]["schedule"] == 30.0
    assert by_task[AB_CHECK]["schedule"] == 30.0
    for entry in by_task.values():
        assert entry["options"]["expires"] == entry["schedule"]
    assert Path(conf.beat_schedule_filename).parent == tmp_path.resolve()


def test_embedded_broker_defaults_and_polling_interval(tmp_path: Path) -> None:
    app = create_celery(embedded(tmp_path / "data"))
    assert (tmp_path / "data").is_dir()
    assert app.conf.broker_url == f"sqla+sqlite:///{tmp_path.resolve() / 'data' / 'broker.db'}"
    assert app.conf.result_backend == f"db+sqlite:///{tmp_path.resolve() / 'data' / 'results.db'}"
    # Not through broker_transport_options: kombu would pass it on to create_engine and crash.
    assert "polling_interval" not in app.conf.broker_transport_options
    assert kombu_sqlalchemy.Transport.polling_interval == DEFAULT_SQLA_POLLING_INTERVAL_S

    create_celery(embedded(tmp_path, broker_polling_interval=0.05))
    assert kombu_sqlalchemy.Transport.polling_interval == 0.05


def test_redis_broker_options(tmp_path: Path) -> None:
    before = kombu_sqlalchemy.Transport.polling_interval
    settings = SimpleNamespace(
        broker_url="redis://example:6379/0",
        result_backend="redis://example:6379/1",
        data_dir=tmp_path,
    )
    conf = create_celery(settings).conf
    assert conf.broker_url == "redis://example:6379/0"
    assert conf.result_backend == "redis://example:6379/1"
    assert conf.broker_transport_options == {"visibility_timeout": REDIS_VISIBILITY_TIMEOUT_S}
    assert kombu_sqlalchemy.Transport.polling_interval == before


def test_urls_agree_with_backend_settings(tmp_path: Path) -> None:
    # model_validate: the fields as given, without this process's PREFLOOP_* environment.
    local = Settings.model_validate({"data_dir": tmp_path})
    assert broker_url_for(local) == local.celery_broker_url
    assert result_backend_for(local) == local.celery_result_backend
    served = Settings.model_validate(
        {
            "data_dir": tmp_path,
            "broker_url": "redis://r:6379/0",
            "result_backend": "redis://r:6379/1",
        }
    )
    assert broker_url_for(served) == "redis://r:6379/0"
    assert result_backend_for(served) == "redis://r:6379/1"


def test_module_app_is_built_from_settings_on_first_access(tmp_path: Path) -> None:
    code = (
        "import json, worker.celery_app as m\n"
        "before = 'app' in vars(m)\n"
        "a = m.app\n"
        "print(json.dumps([before, a is m.app, a.conf.broker_url, a.conf.result_backend,"
        " a.conf.task_acks_late]))\n"
    )
    env = worker_env(PREFLOOP_DATA_DIR=str(tmp_path), PREFLOOP_BROKER_URL="redis://h:6379/3")
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    before, same, broker, backend, acks_late = json.loads(out.stdout.strip().splitlines()[-1])
    assert before is False and same is True and acks_late is True
    assert broker == "redis://h:6379/3"
    assert backend == f"db+sqlite:///{tmp_path / 'results.db'}"


def test_unknown_module_attribute() -> None:
    with pytest.raises(AttributeError):
        _ = celery_module.not_an_attribute


# --- real workers ------------------------------------------------------------------------------


def worker_env(**extra: str) -> dict[str, str]:
    """This process's environment without any Prefloop or test settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFLOOP_", "PING_"))}
    path = [str(REPO_ROOT), str(HERE)]
    if env.get("PYTHONPATH"):
        path.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(path)
    env.update(extra)
    return env


@contextmanager
def celery_worker(
    app_module: str, queues: str, log_path: Path, env: dict[str, str]
) -> Iterator[subprocess.Popen[bytes]]:
    command = [
        sys.executable, "-m", "celery", "-A", app_module, "worker",
        "--pool=solo", "-Q", queues, "--loglevel=INFO",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
        "--hostname", f"deploy-test-{uuid.uuid4().hex[:8]}@%h",
    ]  # fmt: skip
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            yield process
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=15)


def wait_for(result: AsyncResult, process: subprocess.Popen[bytes], log_path: Path) -> Any:
    """The task's return value, failing early (with the worker's log) if the worker dies."""
    deadline = time.monotonic() + RESULT_TIMEOUT_S
    while not result.ready():
        if process.poll() is not None:
            pytest.fail(f"worker exited ({process.returncode}):\n{log_path.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            pytest.fail(
                f"no result in {RESULT_TIMEOUT_S} s; worker log:\n{log_path.read_text()[-4000:]}"
            )
        time.sleep(0.05)
    return result.get(timeout=5)


def ping_round_trip(producer: Celery, env: dict[str, str], tmp_path: Path) -> dict[str, Any]:
    log_path = tmp_path / "worker.log"
    payload = uuid.uuid4().hex
    with celery_worker("ping_app", Queue.CPU.value, log_path, env) as process:
        started = time.monotonic()
        reply = wait_for(producer.send_task(PING_TASK, args=[payload]), process, log_path)
        elapsed = time.monotonic() - started
    assert reply["payload"] == payload
    assert reply["pid"] == process.pid, "answered by the worker subprocess"
    assert reply["queue"] == Queue.CPU.value
    assert reply["acks_late"] is True
    assert reply["reject_on_worker_lost"] is True
    assert reply["prefetch_multiplier"] == 1
    assert elapsed < RESULT_TIMEOUT_S
    return reply


@pytest.mark.redis
@pytest.mark.timeout(60)
def test_round_trip_redis(redis_broker: str, tmp_path: Path) -> None:
    keyprefix = f"prefloop-test-{uuid.uuid4().hex}:"
    env = worker_env(
        PING_BROKER_URL=redis_broker,
        PING_RESULT_BACKEND=redis_broker,
        PING_DATA_DIR=str(tmp_path),
        PING_KEYPREFIX=keyprefix,
    )
    producer = create_celery(
        SimpleNamespace(broker_url=redis_broker, result_backend=redis_broker, data_dir=tmp_path)
    )
    producer.conf.broker_transport_options = {
        **producer.conf.broker_transport_options,
        "global_keyprefix": keyprefix,
    }
    try:
        reply = ping_round_trip(producer, env, tmp_path)
        assert reply["broker_url"].startswith("redis://127.0.0.1:6379/15")
    finally:
        client = redis.Redis.from_url(redis_broker)
        stale = list(client.scan_iter(match=f"{keyprefix}*"))
        if stale:
            client.delete(*stale)
        producer.close()


@pytest.mark.timeout(60)
def test_round_trip_embedded_broker(tmp_path: Path) -> None:
    env = worker_env(PING_DATA_DIR=str(tmp_path))
    producer = create_celery(embedded(tmp_path))
    try:
        reply = ping_round_trip(producer, env, tmp_path)
        assert reply["broker_url"].startswith("sqla+sqlite:///")
    finally:
        producer.close()
    assert (tmp_path / "broker.db").is_file() and (tmp_path / "results.db").is_file()


@pytest.mark.timeout(60)
def test_production_module_serves_a_worker(tmp_path: Path) -> None:
    """``celery -A worker.celery_app worker -Q sample,train,cpu``: one worker for every queue."""
    log_path = tmp_path / "worker.log"
    env = worker_env(PREFLOOP_DATA_DIR=str(tmp_path))
    producer = create_celery(embedded(tmp_path))
    try:
        with celery_worker("worker.celery_app", ALL_QUEUES, log_path, env) as process:
            result = producer.send_task("celery.accumulate", args=[3, 5], kwargs={"index": 1})
            assert wait_for(result, process, log_path) == 5
    finally:
        producer.close()
    # The worker imported worker.tasks (app.conf.imports): its banner lists the named tasks.
    banner = log_path.read_text()
    for name in (TRAIN_ROUND, GENERATE_PAIRS, SWEEP, AB_CHECK):
        assert f". {name}" in banner, name
