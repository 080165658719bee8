"""Load benchmark of the annotation API: concurrent simulated annotators against a real server.

Each simulated annotator loops ``GET /api/v1/pairs/next`` -> ``POST /api/v1/votes`` as fast as
the server answers (closed loop, no think time), against a real ``uvicorn`` server on a fresh
PostgreSQL database. For each concurrency level it prints throughput and p50/p95/p99 latency
per endpoint, then checks that every vote answered 2xx is in the database exactly once.

    python -m bench.api_load              # 10, 100 and 300 annotators, 20 s each
    python -m bench.api_load --quick      # the same table in under 2 minutes

The load generator (aiohttp on uvloop) runs in this process and the server in a child process;
on a 2-core machine they share the cores with PostgreSQL, which bounds what is measured. Under
the table the bench prints what bounds it: the CPU that the server (all uvicorn processes),
the load generator, PostgreSQL (the bench database's backends and the WAL writer /
checkpointer) and every *other* process on the machine used during each level (from
``/proc``), the CPU milliseconds one vote costs each party, and the ceiling that implies if
the machine ran nothing else.

``--think-ms`` adds a pause after each vote (people do not vote back to back): without it the
loop is closed, every annotator always has a request in flight, and by Little's law the mean
latency is simply annotators / throughput.

The v1 contract comes from :mod:`prefloop_client`: the typed client signs the annotators in and
waits for the server; the measured loop builds its requests with the package's ``vote_payload``
and reads pairs with ``parse_pair``, over aiohttp, because hundreds of concurrent annotators
need an asyncio transport that costs the 2-core machine little CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from prefloop_client import API_PREFIX, Choice, PrefloopClient, parse_pair, vote_payload

try:
    import orjson

    _loads = orjson.loads
    _dumps = orjson.dumps
except ImportError:  # pragma: no cover - orjson comes with the dev dependencies
    import json

    _loads = json.loads

    def _dumps(obj: object) -> bytes:
        return json.dumps(obj).encode()


BENCH_DB = "prefloop_bench"
PASSWORD = "bench-annotator-pw"


# ---------------------------------------------------------------------------------------- setup
def recreate_database(admin_url: str, name: str) -> str:
    """Drop and create ``name`` on the server of ``admin_url``; return its SQLAlchemy URL."""
    import psycopg

    dsn = admin_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    base = admin_url.rsplit("/", 1)[0]
    return f"{base}/{name}"


def seed(url: str, data_dir: Path, *, users: int, pairs: int, prompts: int = 50) -> None:
    """Users, prompts, one version, two images per prompt and ``pairs`` within-version pairs.

    Rows go in with bulk inserts (the generator is the worker's job; here only the API is
    measured). Bench users get a cheap argon2 hash, so that logging 300 of them in is quick.
    """
    from argon2 import PasswordHasher
    from PIL import Image as PILImage
    from sqlalchemy import insert

    from backend.db import make_engine
    from backend.migrate import upgrade
    from backend.models import Image, ModelVersion, Pair, PairKind, Prompt, User, VersionStatus
    from backend.storage import ImageStore

    upgrade(url)
    engine = make_engine(url)
    store = ImageStore(data_dir / "images")
    pw_hash = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1).hash(PASSWORD)
    rng = random.Random(0)
    with engine.begin() as conn:
        conn.execute(
            insert(User),
            [{"username": f"ann{i:04d}", "password_hash": pw_hash} for i in range(users)],
        )
        version_id = conn.execute(
            insert(ModelVersion).returning(ModelVersion.id),
            [
                {
                    "name": "bench-base",
                    "base_model": "builtin:shapes",
                    "status": VersionStatus.candidate,
                    "metrics": {},
                }
            ],
        ).scalar_one()
        prompt_ids = (
            conn.execute(
                insert(Prompt).returning(Prompt.id, sort_by_parameter_order=True),
                [{"text": f"bench prompt {i}"} for i in range(prompts)],
            )
            .scalars()
            .all()
        )
        images = []
        for p, prompt_id in enumerate(prompt_ids):
            for side in range(2):
                buf = io.BytesIO()
                PILImage.new("RGB", (32, 32), (p * 5 % 256, side * 200, 90)).save(buf, "PNG")
                rel, sha = store.save(buf.getvalue(), "image/png")
                images.append(
                    {
                        "version_id": version_id,
                        "prompt_id": prompt_id,
                        "seed": side,
                        "cfg": 3.0,
                        "steps": 20,
                        "sampler": "ddim",
                        "width": 32,
                        "height": 32,
                        "sha256": sha,
                        "storage_path": rel,
                    }
                )
        image_ids = (
            conn.execute(insert(Image).returning(Image.id, sort_by_parameter_order=True), images)
            .scalars()
            .all()
        )
        rows = []
        for i in range(pairs):
            p = i % prompts
            rows.append(
                {
                    "kind": PairKind.within_version,
                    "prompt_id": prompt_ids[p],
                    "image_a_id": image_ids[2 * p],
                    "image_b_id": image_ids[2 * p + 1],
                    "active": True,
                    "rand_key": rng.random(),
                }
            )
        for chunk in range(0, len(rows), 5000):
            conn.execute(insert(Pair), rows[chunk : chunk + 5000])
    engine.dispose()


def start_server(url: str, data_dir: Path, port: int, workers: int) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.update(
        {
            "PREFLOOP_DATABASE_URL": url,
            "PREFLOOP_DATA_DIR": str(data_dir),
            "PREFLOOP_ADMIN_PASSWORD": "bench-admin-password",
            "PREFLOOP_SECRET_KEY": "bench-secret-key-" + "x" * 32,
            "PREFLOOP_LOG_LEVEL": "WARNING",
            "PREFLOOP_DAILY_VOTE_CAP": "1000000",
            "PREFLOOP_WEEKLY_VOTE_CAP": "1000000",
            "PREFLOOP_GOLD_FRACTION": "0",
            "PREFLOOP_DB_POOL_SIZE": "20",
            "PREFLOOP_LOGIN_RATE_LIMIT_ATTEMPTS": "100000",
        }
    )
    cmd = [
        sys.executable,
        "-m",
        "uvicorn",
        "backend.main:create_app",
        "--factory",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--no-access-log",
        "--log-level",
        "warning",
        "--loop",
        "uvloop",
        "--http",
        "httptools",
    ]
    log = open(data_dir / "server.log", "wb")  # noqa: SIM115 - the child keeps it open
    return subprocess.Popen(cmd, env=env, start_new_session=True, stdout=log, stderr=log)


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


# ---------------------------------------------------------------------------------------- cpu
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, user+system CPU seconds) of a live process, from ``/proc/<pid>/stat``."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2 :].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read()
    except OSError:
        return b""


def _machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from ``/proc/stat``."""
    with open("/proc/stat") as fh:
        vals = [int(x) for x in fh.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return (sum(vals[:8]) - idle) / _TICK, sum(vals[:8]) / _TICK


_PG_BACKGROUND = (b"walwriter", b"checkpointer", b"background writer", b"autovacuum launcher")


@dataclass
class CpuSnapshot:
    wall: float
    server: dict[int, float]
    loadgen: float
    postgres: dict[int, float]
    machine_busy: float
    machine_total: float


class CpuMeter:
    """CPU seconds used during a level by each party, read from ``/proc`` (Linux):

    - the server: the uvicorn supervisor and all its descendants (the workers);
    - the load generator: this process (the aiohttp clients);
    - PostgreSQL: the backends serving the bench database (their command line names it) plus
      the shared background processes (WAL writer, checkpointer...), which the bench drives;
    - the whole machine (``/proc/stat``), so that the CPU taken by *other* processes on a
      shared machine shows up too.

    A party's figure is its CPU seconds over the level's wall time, in % of one core.
    """

    def __init__(self, server_pid: int, db_name: str) -> None:
        self.server_pid = server_pid
        self.db_tag = db_name.encode()
        self.available = os.path.exists("/proc/self/stat")

    def _scan(self) -> tuple[dict[int, float], dict[int, float]]:
        stats: dict[int, tuple[int, float]] = {}
        pg: dict[int, float] = {}
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            pid = int(name)
            st = _proc_stat(pid)
            if st is None:
                continue
            stats[pid] = st
            cmd = _cmdline(pid)
            if cmd.startswith(b"postgres: ") and (
                self.db_tag in cmd or any(k in cmd for k in _PG_BACKGROUND)
            ):
                pg[pid] = st[1]
        tree = {self.server_pid}
        changed = True
        while changed:
            changed = False
            for pid, (ppid, _) in stats.items():
                if ppid in tree and pid not in tree:
                    tree.add(pid)
                    changed = True
        server = {pid: stats[pid][1] for pid in tree if pid in stats}
        return server, pg

    def snapshot(self) -> CpuSnapshot | None:
        if not self.available:
            return None
        server, pg = self._scan()
        own = _proc_stat(os.getpid())
        busy, total = _machine_busy()
        return CpuSnapshot(time.perf_counter(), server, own[1] if own else 0.0, pg, busy, total)


@dataclass
class CpuUse:
    """Percent of one core used during a level (200% = both cores of a 2-core machine)."""

    server: float
    loadgen: float
    postgres: float
    other: float
    machine: float
    cores: int


def cpu_between(a: CpuSnapshot | None, b: CpuSnapshot | None) -> CpuUse | None:
    if a is None or b is None:
        return None
    wall = b.wall - a.wall

    def delta(x: dict[int, float], y: dict[int, float]) -> float:
        # a process that exited during the level loses its last slice; one that started
        # counts from zero.
        return sum(v - x.get(pid, 0.0) for pid, v in y.items())

    server = delta(a.server, b.server)
    pg = delta(a.postgres, b.postgres)
    loadgen = b.loadgen - a.loadgen
    machine = b.machine_busy - a.machine_busy
    cores = os.cpu_count() or 1
    other = max(machine - server - pg - loadgen, 0.0)
    pct = lambda v: 100.0 * v / wall  # noqa: E731
    return CpuUse(pct(server), pct(loadgen), pct(pg), pct(other), pct(machine), cores)


# ---------------------------------------------------------------------------------------- load
@dataclass
class LevelResult:
    annotators: int
    seconds: float
    votes: int = 0
    empty: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    lat: dict[str, list[float]] = field(default_factory=lambda: {"next": [], "vote": []})
    cpu: CpuUse | None = None

    def pct(self, ep: str, q: float) -> float:
        xs = self.lat[ep]
        return float(np.percentile(xs, q)) * 1000 if xs else float("nan")


def wait_ready(base: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    with PrefloopClient(base) as client:
        while time.monotonic() < deadline:
            if client.healthy():
                return
            time.sleep(0.3)
    raise RuntimeError(f"server at {base} did not become healthy in {timeout} s")


def login_all(base: str, names: list[str]) -> list[str]:
    """Sign every annotator in through the typed client (8 at a time: argon2 costs CPU)."""
    from concurrent.futures import ThreadPoolExecutor

    with PrefloopClient(base) as client, ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda name: client.login(name, PASSWORD), names))


async def run_level(
    base: str,
    tokens: list[str],
    seconds: float,
    vote_ids: list[int],
    meter: CpuMeter | None = None,
    think_ms: float = 0.0,
) -> LevelResult:
    import aiohttp

    res = LevelResult(annotators=len(tokens), seconds=seconds)
    conn = aiohttp.TCPConnector(limit=0, force_close=False)
    choices: list[Choice] = ["left", "right", "left", "right", "tie"]
    stop_at = time.perf_counter() + seconds

    async with aiohttp.ClientSession(connector=conn) as s:

        def error(key: str) -> None:
            res.errors[key] = res.errors.get(key, 0) + 1

        async def annotator(token: str, seed: int) -> None:
            rnd = random.Random(seed)
            hdr = {"Authorization": f"Bearer {token}"}
            vote_hdr = {**hdr, "Content-Type": "application/json"}
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                try:
                    async with s.get(f"{base}{API_PREFIX}/pairs/next", headers=hdr) as r:
                        body = await r.read()
                        status = r.status
                except aiohttp.ClientError as exc:
                    error(f"next {type(exc).__name__}")
                    await asyncio.sleep(0.05)
                    continue
                res.lat["next"].append(time.perf_counter() - t0)
                if status == 204:
                    res.empty += 1
                    await asyncio.sleep(0.05)
                    continue
                if status != 200:
                    error(f"next {status}")
                    continue
                pair = parse_pair(_loads(body))
                payload = _dumps(vote_payload(pair.pair_id, rnd.choice(choices), uuid.uuid4().hex))
                t0 = time.perf_counter()
                try:
                    async with s.post(
                        f"{base}{API_PREFIX}/votes", data=payload, headers=vote_hdr
                    ) as r:
                        vb = await r.read()
                        vstatus = r.status
                except aiohttp.ClientError as exc:
                    # The vote may or may not be stored; it was not acknowledged.
                    error(f"vote {type(exc).__name__}")
                    continue
                res.lat["vote"].append(time.perf_counter() - t0)
                if vstatus in (200, 201):
                    res.votes += 1
                    vote_ids.append(_loads(vb)["vote_id"])
                else:
                    error(f"vote {vstatus}")
                if think_ms:  # a person looking at the next pair: 0.5x to 1.5x the mean
                    await asyncio.sleep(think_ms / 1000 * (0.5 + rnd.random()))

        before = meter.snapshot() if meter else None
        started = time.perf_counter()
        await asyncio.gather(*(annotator(t, i) for i, t in enumerate(tokens)))
        res.seconds = time.perf_counter() - started
        res.cpu = cpu_between(before, meter.snapshot() if meter else None)
    return res


def stored_votes(url: str) -> tuple[set[int], int]:
    """The ids of every stored vote, and how many (user, pair) appear more than once."""
    from sqlalchemy import func, select

    from backend.db import make_engine
    from backend.models import Vote

    engine = make_engine(url)
    with engine.connect() as c:
        ids = set(c.execute(select(Vote.id)).scalars())
        dup = c.execute(
            select(func.count()).select_from(
                select(Vote.user_id, Vote.pair_id)
                .group_by(Vote.user_id, Vote.pair_id)
                .having(func.count() > 1)
                .subquery()
            )
        ).scalar_one()
    engine.dispose()
    return ids, int(dup)


def print_table(results: list[LevelResult], workers: int, think_ms: float = 0.0) -> None:
    hdr = (
        f"{'annotators':>10} {'votes/s':>8} {'req/s':>7} {'next p50':>9} {'p95':>7} {'p99':>7}"
        f" {'vote p50':>9} {'p95':>7} {'p99':>7} {'204s':>5} {'errors':>7}"
    )
    loop = f"think time {think_ms:.0f} ms" if think_ms else "closed loop, no think time"
    print(f"\nAPI load (uvicorn workers={workers}, PostgreSQL, {loop}; latencies in ms)")
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        reqs = (len(r.lat["next"]) + len(r.lat["vote"])) / r.seconds
        print(
            f"{r.annotators:>10} {r.votes / r.seconds:>8.0f} {reqs:>7.0f}"
            f" {r.pct('next', 50):>9.1f} {r.pct('next', 95):>7.1f} {r.pct('next', 99):>7.1f}"
            f" {r.pct('vote', 50):>9.1f} {r.pct('vote', 95):>7.1f} {r.pct('vote', 99):>7.1f}"
            f" {r.empty:>5} {sum(r.errors.values()):>7}"
        )
    for r in results:
        if r.errors:
            print(f"  errors at {r.annotators}: {r.errors}")
    if not think_ms and results:
        r = max(results, key=lambda r: r.annotators)
        reqs = (len(r.lat["next"]) + len(r.lat["vote"])) / r.seconds
        print(
            f"Closed loop without think time: each annotator always has one request in flight, "
            f"so by Little's law the mean latency is annotators / req/s whatever the server "
            f"does ({r.annotators} / {reqs:.0f} = {1000 * r.annotators / reqs:.0f} ms at "
            f"{r.annotators}); latencies at many annotators measure the queue, not the "
            f"request. Use --think-ms to model people."
        )
    print_bounds(results)


def print_bounds(results: list[LevelResult]) -> None:
    """What bounds the figures: the CPU each party used during each level, and per vote."""
    rows = [r for r in results if r.cpu is not None]
    if not rows:
        print("\n(CPU accounting needs Linux /proc; not available here)")
        return
    cores = rows[0].cpu.cores  # type: ignore[union-attr]
    print(
        f"\nWhat bounds it: CPU during each level, in % of one core ({cores} cores = "
        f"{100 * cores}%), and CPU ms per vote (one next-pair + one vote)"
    )
    hdr = (
        f"{'annotators':>10} {'server':>7} {'loadgen':>8} {'postgres':>9} {'others':>7}"
        f" {'machine':>8} | {'server':>7} {'loadgen':>8} {'postgres':>9} {'total':>6}"
        f" {'idle-machine bound':>19}"
    )
    print(f"{'':>10} {'% of one core during the level':^44} | {'CPU ms per vote':^33}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        c = r.cpu
        assert c is not None
        vps = r.votes / r.seconds if r.seconds else 0.0
        per = lambda pct, vps=vps: 10.0 * pct / vps if vps else float("nan")  # noqa: E731
        total = per(c.server) + per(c.loadgen) + per(c.postgres)
        bound = 1000.0 * cores / total if total and total == total else float("nan")
        print(
            f"{r.annotators:>10} {c.server:>6.0f}% {c.loadgen:>7.0f}% {c.postgres:>8.0f}%"
            f" {c.other:>6.0f}% {c.machine:>7.0f}% | {per(c.server):>7.2f} {per(c.loadgen):>8.2f}"
            f" {per(c.postgres):>9.2f} {total:>6.2f} {bound:>13.0f} v/s"
        )
    worst = max(rows, key=lambda r: r.annotators)
    c = worst.cpu
    assert c is not None
    busy = c.machine / cores
    parts = sorted(
        [
            ("the API server", c.server),
            ("the load generator", c.loadgen),
            ("PostgreSQL", c.postgres),
            ("other processes on this machine", c.other),
        ],
        key=lambda kv: -kv[1],
    )
    print(
        f"At {worst.annotators} annotators the machine's cores were {busy:.0f}% busy: "
        + ", ".join(f"{name} {pct:.0f}%" for name, pct in parts)
        + " (of one core)."
    )
    if busy >= 90:
        print(
            "The cores are saturated, so throughput is bounded by CPU: the votes/s above is "
            "what is left of the cores after the load generator (and any other process), and "
            "'idle-machine bound' is the cores divided by the CPU one vote costs server + "
            "load generator + PostgreSQL (the ceiling if nothing else ran)."
        )
    else:
        print(
            "The cores are not saturated, so throughput is bounded by latency (database round "
            "trips, WAL fsync at commit, connection-pool waits), not by CPU."
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="under 2 minutes: 6 s per level")
    p.add_argument("--levels", default="10,100,300", help="comma-separated annotator counts")
    p.add_argument("--seconds", type=float, default=20.0, help="duration of each level")
    p.add_argument("--workers", type=int, default=2, help="uvicorn worker processes")
    p.add_argument(
        "--think-ms",
        type=float,
        default=0.0,
        help="mean pause of an annotator after each vote (0: closed loop, as fast "
        "as the server answers)",
    )
    p.add_argument("--pairs", type=int, default=60000)
    p.add_argument("--port", type=int, default=8765)
    p.add_argument(
        "--admin-db-url",
        default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
        help="a PostgreSQL URL allowed to CREATE DATABASE",
    )
    a = p.parse_args(argv)
    if a.quick:
        a.seconds, a.pairs = 6.0, 20000
    levels = [int(x) for x in a.levels.split(",")]

    url = recreate_database(a.admin_db_url, BENCH_DB)
    data_dir = Path(tempfile.mkdtemp(prefix="prefloop-bench-"))
    t0 = time.perf_counter()
    seed(url, data_dir, users=max(levels), pairs=a.pairs)
    print(
        f"seeded {max(levels)} annotators and {a.pairs} pairs in {time.perf_counter() - t0:.1f} s"
    )

    server = start_server(url, data_dir, a.port, a.workers)
    meter = CpuMeter(server.pid, BENCH_DB)
    base = f"http://127.0.0.1:{a.port}"
    results: list[LevelResult] = []
    vote_ids: list[int] = []
    try:
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
        wait_ready(base)
        tokens = login_all(base, [f"ann{i:04d}" for i in range(max(levels))])
        for n in levels:
            asyncio.run(run_level(base, tokens[:1], 1.0, vote_ids))  # warm-up
            r = asyncio.run(run_level(base, tokens[:n], a.seconds, vote_ids, meter, a.think_ms))
            results.append(r)
            print(f"  {n} annotators: {r.votes / r.seconds:.0f} votes/s")
    finally:
        stop_server(server)

    print_table(results, a.workers, a.think_ms)
    server_log = data_dir / "server.log"
    errors = sum(
        1
        for line in server_log.open("rb")
        if b'"level": "ERROR"' in line or line.startswith(b"ERROR:")
    )
    if errors:
        print(f"\nthe server logged {errors} error lines: {server_log}")
    stored, duplicated = stored_votes(url)
    acked = set(vote_ids)
    lost = acked - stored
    print(
        f"\nvotes acknowledged 2xx: {len(acked)}; rows in the database: {len(stored)}"
        + (
            f" ({len(stored - acked)} stored whose answer the client never got)"
            if stored - acked
            else ""
        )
    )
    ok = not lost and not duplicated and len(vote_ids) == len(acked)
    print(
        "every acknowledged vote is stored exactly once"
        if ok
        else f"MISMATCH: {len(lost)} acknowledged votes missing, {duplicated} duplicated"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
