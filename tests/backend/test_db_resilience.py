"""PostgreSQL restarts: once the server is back no request fails (the pool pings at
checkout), and during the outage requests get 503 with ``Retry-After``, never a 500.

The test starts its own PostgreSQL cluster (``initdb`` + ``pg_ctl`` in a temporary directory,
on a free port) and restarts that one; the machine's shared server is never touched. As root,
the binaries run as the ``postgres`` user (``initdb`` refuses root)."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from backend.main import create_app
from backend.migrate import upgrade
from tests.backend.conftest import RecordingDispatcher, make_settings

pytestmark = pytest.mark.postgres


def _bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if found:
        return Path(found[-1]).parent
    exe = shutil.which("pg_ctl")
    return Path(exe).parent if exe else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateCluster:
    def __init__(self, root: Path) -> None:
        bindir = _bindir()
        if bindir is None:
            pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found")
        self.bindir = bindir
        self.root = root
        self.data = root / "data"
        self.port = _free_port()
        self.user: str | None = None
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("running as root and there is no 'postgres' user for initdb")
            self.user = "postgres"
            os.chown(root, pw.pw_uid, pw.pw_gid)

    def _run(self, *args: str, timeout: float = 60) -> None:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.user is not None:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise subprocess.CalledProcessError(
                done.returncode, cmd, done.stdout, f"{done.stderr}\n{self._log_tail()}"
            )

    def _log_tail(self) -> str:
        try:
            return (self.root / "log").read_text()[-2000:]
        except OSError:
            return ""

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")

    def start(self) -> None:
        opts = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c full_page_writes=off -c max_connections=50"
        )
        self._run(
            "pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.root / "log"), "-w", "start"
        )

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"


@pytest.fixture(scope="module")
def cluster() -> Iterator[PrivateCluster]:
    # Not under pytest's tmp dir: that is private to root, and the server runs as postgres.
    root = Path(tempfile.mkdtemp(prefix="prefloop-pg-"))
    try:
        c = PrivateCluster(root)
        c.init()
        c.start()
        try:
            upgrade(c.url)
            yield c
        finally:
            try:
                c.stop("immediate")
            except subprocess.CalledProcessError:
                pass
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def api(cluster: PrivateCluster, tmp_path: Path) -> Iterator[tuple[TestClient, dict]]:
    settings = make_settings(cluster.url, tmp_path, db_pool_size=4, db_max_overflow=0)
    app = create_app(settings, RecordingDispatcher())
    with TestClient(app) as client:
        r = client.post(
            "/api/v1/auth/token", data={"username": "admin", "password": "admin-password-1"}
        )
        assert r.status_code == 200, r.text
        yield client, {"Authorization": f"Bearer {r.json()['access_token']}"}


PATHS = ["/api/v1/users/me", "/api/v1/pairs/next", "/api/v1/users"]


def _warm_pool(client: TestClient, headers: dict) -> None:
    """Fill the pool with connections that the restart will kill."""
    done = []

    def go() -> None:
        for path in PATHS:
            done.append(client.get(path, headers=headers).status_code)

    threads = [threading.Thread(target=go) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(done) <= {200, 204}, done


def test_first_requests_after_a_restart_succeed(cluster, api):
    client, headers = api
    _warm_pool(client, headers)
    cluster.stop("fast")
    cluster.start()
    codes = [client.get(p, headers=headers).status_code for p in PATHS * 3]
    assert set(codes) <= {200, 204}, codes


def test_restart_under_load_is_503_while_down_and_no_failure_once_back(cluster, api):
    client, headers = api
    _warm_pool(client, headers)
    results: list[tuple[float, float, int, str | None]] = []
    stop = threading.Event()

    def load(i: int) -> None:
        path = PATHS[i % len(PATHS)]
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                r = client.get(path, headers=headers)
            except Exception as exc:  # noqa: BLE001 - an error escaping the app is a failure
                results.append((t0, time.monotonic(), -1, repr(exc)))
                continue
            results.append((t0, time.monotonic(), r.status_code, r.headers.get("retry-after")))

    threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    down_at = time.monotonic()
    cluster.stop("fast")
    time.sleep(0.5)
    cluster.start()  # -w: returns once the server accepts connections
    back_at = time.monotonic()
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join()

    codes = [c for _, _, c, _ in results]
    assert set(codes) <= {200, 204, 503}, [r for r in results if r[2] not in (200, 204, 503)][:3]
    assert all(ra is not None for _, _, c, ra in results if c == 503)
    during = [c for t0, _, c, _ in results if down_at + 0.1 < t0 and t0 + 0.05 < back_at - 0.3]
    assert 503 in during, "the outage was not observed"
    after = [c for t0, _, c, _ in results if t0 > back_at]
    assert len(after) >= 8 and set(after) <= {200, 204}, after
