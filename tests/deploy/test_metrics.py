"""Prometheus: ``/metrics`` under several uvicorn workers, queue depths, worker metric labels.

The server test runs the real ``prefloop serve --workers 2`` (SQLite, local mode): requests
land on both processes, and every scrape, whichever process answers it, counts all of them.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import httpx
import pytest
import redis
from kombu.transport import sqlalchemy as kombu_sqlalchemy

from backend.queues import GENERATE_PAIRS, TRAIN_ROUND, Queue, queue_depths
from worker.celery_app import create_celery
from worker.metrics import failure_reason

REPO_ROOT = Path(__file__).resolve().parents[2]
REDIS_URL = "redis://127.0.0.1:6379/15"
HEALTHZ = re.compile(
    r'^prefloop_http_requests_total\{method="GET",route="/healthz",status="200"\} (\S+)$', re.M
)


@pytest.fixture(autouse=True)
def _restore_sqla_polling_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        kombu_sqlalchemy.Transport, "polling_interval", kombu_sqlalchemy.Transport.polling_interval
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_queue_depths_on_the_embedded_broker(tmp_path: Path) -> None:
    app = create_celery(
        type("S", (), {"broker_url": None, "result_backend": None, "data_dir": tmp_path})()
    )
    assert queue_depths(app.conf.broker_url) == {q.value: 0 for q in Queue}  # no table yet
    for _ in range(3):
        app.send_task(GENERATE_PAIRS)
    app.send_task(TRAIN_ROUND, args=[1])
    assert queue_depths(app.conf.broker_url) == {"sample": 3, "train": 1, "cpu": 0}


@pytest.mark.redis
def test_queue_depths_on_redis(unavailable: Callable[[str], NoReturn]) -> None:
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        unavailable(f"Redis is not reachable at {REDIS_URL}: {exc}")
    name = f"prefloop-test-{uuid.uuid4().hex}"
    try:
        client.lpush(name, "a", "b")
        client.lpush(f"{name}\x06\x163", "c")  # kombu's list for priority 3
        assert queue_depths(REDIS_URL, [name, name + "-empty"]) == {name: 3, name + "-empty": 0}
    finally:
        client.delete(name, f"{name}\x06\x163")
        client.close()


def test_round_failure_reasons_are_bounded() -> None:
    assert failure_reason("training diverged at step 7: loss spike") == "diverged"
    assert failure_reason("ValueError: no pairs") == "ValueError"
    assert failure_reason("torch.OutOfMemoryError: CUDA out of memory") == "OutOfMemoryError"
    assert failure_reason("the round has no training pairs") == "failed"
    assert failure_reason(None) == "failed"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_metrics_sum_over_two_uvicorn_workers(tmp_path: Path) -> None:
    port = _free_port()
    data_dir = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFLOOP_", "PROMETHEUS_"))}
    env.update(
        PREFLOOP_DATA_DIR=str(data_dir),
        PREFLOOP_HOST="127.0.0.1",
        PREFLOOP_PORT=str(port),
        PREFLOOP_ADMIN_PASSWORD="metrics-test-admin-password",
        PREFLOOP_LOG_JSON="false",
        GRADIO_ANALYTICS_ENABLED="False",
        HF_HUB_OFFLINE="1",
    )
    log_path = tmp_path / "server.log"
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "backend.cli", "serve", "--workers", "2"],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, log_path.read_text(errors="replace")[-4000:]
            assert time.monotonic() < deadline, log_path.read_text(errors="replace")[-4000:]
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        multiproc = data_dir / "prometheus"

        def pids() -> set[str]:
            return {p.stem.rsplit("_", 1)[-1] for p in multiproc.glob("counter_*.db")}

        # Fresh connections until both processes have answered (the kernel spreads accepts).
        sent = 1
        while len(pids()) < 2 and sent < 400:
            assert httpx.get(f"{url}/healthz", headers={"Connection": "close"}).status_code == 200
            sent += 1
        assert len(pids()) == 2, f"one process answered all {sent} requests"
        for _ in range(20):
            assert httpx.get(f"{url}/healthz", headers={"Connection": "close"}).status_code == 200
            sent += 1

        for _ in range(6):  # whichever process answers the scrape
            text = httpx.get(f"{url}/metrics", headers={"Connection": "close"}).text
            (count,) = HEALTHZ.findall(text)
            assert float(count) == sent
            assert "prefloop_pool_ready_pairs 0.0" in text
            assert 'prefloop_queue_depth{queue="train"} 0.0' in text
            assert 'prefloop_state_read_ok{source="broker"} 1.0' in text
            assert 'prefloop_state_read_ok{source="database"} 1.0' in text
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
