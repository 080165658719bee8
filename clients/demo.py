"""``make demo``: the whole loop on one machine, with the embedded defaults.

SQLite under ``./var`` (or ``--data-dir``), kombu's SQLAlchemy broker on SQLite (no server),
and the built-in model ``builtin:shapes``. The demo:

1. brings the database to head (``alembic upgrade head``);
2. starts the API + UI server (``prefloop serve``), two Celery workers (``--pool=solo``): one on
   the ``sample`` and ``cpu`` queues (pool refills, bookkeeping), one on ``train`` (rounds), so
   that annotators keep getting pairs while a round trains; and Celery beat (the pool refill and
   the round sweeper); each a child process logging to ``<data dir>/logs/``; and asks for a
   first pool refill at once;
3. waits for ``/healthz``, prints the URL and the admin account;
4. runs a few simulated annotators (:mod:`clients.simulated_annotator`) that vote through the
   public API, guided by their taste (``--taste``, default
   :data:`worker.shapes.tastes.DEMO_MIX`: the world's judge mixed with a liking for brighter
   images) with some label noise, until ``--votes`` votes are in;
5. starts a training round through the API as admin (``POST /api/v1/rounds``, a few steps sized
   for a CPU) and follows it with a progress bar; the round holds out 15% of the votes by
   prompt, keeps its best held-out checkpoint within its drift budget, and makes a candidate
   only if it learned what the annotators prefer (docs/rounds.md);
6. runs the candidate's blind A/B against its parent: the pool serves candidate-vs-parent pairs
   (``PREFLOOP_AB_SHARE``, 0.5 in the demo), the same annotators keep voting, and a progress bar
   follows ``GET /api/v1/versions/{id}/ab`` until the sequential test promotes (the version is
   published: the publish policy ``human``) or rejects it (docs/publishing.md);
7. prints a summary: votes, the round's held-out figures, the judge's change, and the A/B win
   rate with its interval and the decision;
8. keeps serving until Ctrl-C (or exits, with ``--exit-after-loop``), then stops every child.

Run it with ``make demo`` or ``python -m clients.demo`` (``--help`` lists the knobs).
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backend.queues import GENERATE_PAIRS, LOCAL_WORKERS
from prefloop_client import ApiError, PrefloopClient
from worker.shapes.tastes import DEMO_MIX, TasteMix, available_tastes

REPO_ROOT = Path(__file__).resolve().parent.parent
HEALTH_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 20.0
ADMIN_PASSWORD_FILE = "demo_admin_password"
#: The demo's pool: small enough to fill in about a minute on a laptop CPU.
DEMO_POOL_TARGET = 64
#: The demo's A/B share of served pairs while a candidate is judged (product default 0.25).
DEMO_AB_SHARE = "0.5"


# ---------------------------------------------------------------------------- children
@dataclass
class _Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    log_offset: int = 0  # where this run's lines start in the (appended) log

    def log_text(self) -> str:
        with open(self.log_path, "rb") as fh:
            fh.seek(self.log_offset)
            return fh.read().decode(errors="replace")


@dataclass
class Children:
    """The demo's child processes; :meth:`stop` ends them all (also on Ctrl-C)."""

    env: dict[str, str]
    log_dir: Path
    children: list[_Child] = field(default_factory=list)

    def start(self, name: str, args: list[str]) -> _Child:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        offset = log_path.stat().st_size if log_path.exists() else 0
        log = open(log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        proc = subprocess.Popen(
            [sys.executable, *args],
            cwd=REPO_ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        child = _Child(name, proc, log_path, offset)
        self.children.append(child)
        return child

    def check_alive(self) -> None:
        for c in self.children:
            code = c.proc.poll()
            if code is not None:
                tail = c.log_text()[-3000:]
                raise RuntimeError(f"{c.name} exited with status {code}; its log ends:\n{tail}")

    def stop(self) -> None:
        """SIGTERM every child (newest first), wait, then SIGKILL what is left."""
        for c in reversed(self.children):
            if c.proc.poll() is None:
                c.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for c in reversed(self.children):
            try:
                c.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                c.proc.kill()
                c.proc.wait(timeout=10)
        self.children.clear()


@contextmanager
def _terminate_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt, so that ``finally`` blocks stop the children."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------------------- helpers
def admin_password(data_dir: Path) -> str:
    """``PREFLOOP_ADMIN_PASSWORD`` when set; else the demo's own, made once and kept (0600) in
    the data dir, and given to the server, which sets the admin account's password to it."""
    configured = os.environ.get("PREFLOOP_ADMIN_PASSWORD")
    if configured:
        return configured
    path = data_dir / ADMIN_PASSWORD_FILE
    if path.is_file():
        return path.read_text().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    password = secrets.token_urlsafe(12)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(password)
    return password


def wait_for_pairs(settings: Any, children: Children, timeout: float) -> int:
    """Wait until the worker has put pairs in the pool; fail fast, with the worker's error,
    when its pool refill raised (a missing model checkpoint, say)."""
    from sqlalchemy import func, select

    from backend.db import Database
    from backend.models import Pair

    db = Database(settings.db_url, pool_size=1, max_overflow=0)
    worker = next(c for c in children.children if c.name == "worker-sample")
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            children.check_alive()
            with db.read_session() as s:
                ready = s.scalar(select(func.count()).select_from(Pair).where(Pair.active))
            if ready:
                return int(ready)
            for line in worker.log_text().splitlines():
                if "pairs.generate" in line and "raised unexpected" in line:
                    raise RuntimeError(f"the worker could not fill the pair pool: {line}")
            time.sleep(1.0)
    finally:
        db.dispose()
    raise RuntimeError(f"no pairs after {timeout:.0f} s; see {worker.log_path}")


def port_is_free(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_for_health(url: str, children: Children, timeout: float = HEALTH_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    with PrefloopClient(url) as client:
        while time.monotonic() < deadline:
            children.check_alive()
            if client.healthy():
                return
            time.sleep(0.5)
    raise RuntimeError(f"the server did not answer {url}/healthz within {timeout:.0f} s")


@dataclass
class Admin:
    """The demo's admin: the typed v1 client and the admin's token (over HTTP like any client)."""

    client: PrefloopClient
    token: str

    @classmethod
    def sign_in(cls, url: str, username: str, password: str) -> Admin:
        client = PrefloopClient(url, timeout_s=60)
        try:
            token = client.login(username, password)
        except ApiError as exc:
            client.close()
            raise RuntimeError(
                f"admin login failed ({exc}): set PREFLOOP_ADMIN_PASSWORD to the password of "
                f"{username!r}"
            ) from exc
        return cls(client, token)

    def close(self) -> None:
        self.client.close()


def run_annotators(
    url: str,
    votes: int,
    annotators: int,
    noise: float,
    max_seconds: float,
    taste: TasteMix | None = None,
    stop: threading.Event | None = None,
) -> dict[str, int]:
    """Simulated annotators voting in parallel until ``votes`` votes are in (or, with ``stop``,
    until it is set); ``taste`` (a :class:`~worker.shapes.tastes.TasteMix`, default: the judge
    alone) is what they prefer."""
    from clients.simulated_annotator import SimulatedAnnotator

    share = [votes // annotators + (1 if i < votes % annotators else 0) for i in range(annotators)]
    totals: dict[str, int] = {}
    lock = threading.Lock()
    errors: list[BaseException] = []

    def one(i: int) -> None:
        ann = SimulatedAnnotator(
            url,
            f"sim-annotator-{i}",
            f"sim-annotator-{i}-password",
            taste=taste,
            noise=noise,
            seed=i,
        )
        try:
            if stop is None:
                stats = ann.run(share[i], max_seconds=max_seconds)
            else:
                deadline = time.monotonic() + max_seconds
                while not stop.is_set() and time.monotonic() < deadline:
                    if ann.step() is None:
                        stop.wait(0.5)
                stats = ann.stats
            with lock:
                totals["votes"] = totals.get("votes", 0) + stats.votes
                for k, v in stats.counts.items():
                    totals[k] = totals.get(k, 0) + v
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            errors.append(exc)
        finally:
            ann.close()

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(annotators)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"a simulated annotator failed: {errors[0]!r}") from errors[0]
    return totals


def follow_round(api: Admin, round_id: int, children: Children) -> dict[str, Any]:
    """Poll the round, drawing a progress bar, until it finishes."""
    from tqdm.auto import tqdm

    rnd = api.client.get_round(api.token, round_id)
    bar = tqdm(total=max(1, rnd["total_steps"]), desc=f"round {round_id}", unit="step")
    try:
        while True:
            children.check_alive()
            rnd = api.client.get_round(api.token, round_id)
            if rnd["total_steps"] != bar.total:  # capped by max_epochs once the pairs are known
                bar.total = max(1, rnd["total_steps"])
            bar.n = rnd["step"]
            loss = rnd["metrics"].get("loss")
            bar.set_postfix(status=rnd["status"], loss=f"{loss:.4f}" if loss is not None else "-")
            bar.refresh()
            if rnd["status"] in ("succeeded", "failed", "cancelled"):
                return dict(rnd)
            time.sleep(1.0)
    finally:
        bar.close()


def follow_ab(
    api: Admin, version_id: int, children: Children, max_seconds: float
) -> dict[str, Any]:
    """Poll the candidate's blind A/B gate (``GET /versions/{id}/ab``), drawing a bar of the
    votes it has against its budget, until it is decided or ``max_seconds`` pass."""
    from tqdm.auto import tqdm

    ab = api.client.version_ab(api.token, version_id)
    gate = ab.get("gate") or {}
    bar = tqdm(total=max(1, int(gate.get("budget") or 1)), desc="A/B vs parent", unit="vote")
    deadline = time.monotonic() + max_seconds
    try:
        while True:
            children.check_alive()
            ab = api.client.version_ab(api.token, version_id)
            gate = ab.get("gate") or {}
            bar.n = int(gate.get("battles") or 0)
            rate = gate.get("win_rate")
            bar.set_postfix(
                W=gate.get("wins", 0),
                L=gate.get("losses", 0),
                T=gate.get("ties", 0),
                win=f"{rate:.2f}" if isinstance(rate, float) else "-",
                state=gate.get("state", "-"),
            )
            bar.refresh()
            if gate.get("state") not in (None, "open") or time.monotonic() > deadline:
                return dict(ab)
            time.sleep(1.0)
    finally:
        bar.close()


def ab_phase(
    a: argparse.Namespace,
    api: Admin,
    url: str,
    version_id: int,
    settings: Any,
    children: Children,
) -> dict[str, Any]:
    """The candidate's blind A/B against its parent: the pool serves candidate-vs-parent pairs
    beside the usual ones, the same simulated annotators keep voting (blind: they see a prompt
    and two images), and the sequential test decides. Returns ``GET /versions/{id}/ab``."""
    from worker.celery_app import create_celery

    create_celery(settings).send_task(GENERATE_PAIRS)  # the A/B pairs now, not at beat's tick
    stop = threading.Event()
    voters = threading.Thread(
        target=run_annotators,
        args=(url, 0, a.annotators, a.noise, a.ab_timeout, a.taste, stop),
        daemon=True,
    )
    voters.start()
    try:
        return follow_ab(api, version_id, children, a.ab_timeout)
    finally:
        stop.set()
        voters.join(timeout=30)


def summary_table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 3 + max(len(v) for _, v in rows))
    return "\n".join([line, *(f"{k.ljust(width)} | {v}" for k, v in rows), line])


def _fmt(x: Any, digits: int = 4) -> str:
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


# ---------------------------------------------------------------------------- main
def _taste_arg(spec: str) -> str:
    """``--taste``: checked here (``TasteMix.parse`` names a bad part), parsed with the noise."""
    try:
        TasteMix.parse(spec)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return spec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m clients.demo",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("PREFLOOP_DATA_DIR", "var")),
        help="database, broker, images, models and logs",
    )
    p.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("PREFLOOP_PORT", "8000")),
        help="the API + UI server's port",
    )
    p.add_argument("--annotators", type=int, default=3, help="simulated annotators")
    p.add_argument("--votes", type=int, default=200, help="votes to collect before training")
    p.add_argument("--noise", type=float, default=0.1, help="annotators' label noise")
    p.add_argument(
        "--taste",
        type=_taste_arg,
        default=DEMO_MIX,
        help="annotators' taste: weighted tastes, e.g. 'fidelity:1,brightness:0.5' "
        f"(tastes: {', '.join(available_tastes())})",
    )
    p.add_argument("--steps", type=int, default=100, help="training steps of the round")
    p.add_argument("--eval-prompts", type=int, default=32, help="held-out prompts judged")
    p.add_argument("--vote-timeout", type=float, default=900.0, help="seconds to collect votes")
    p.add_argument(
        "--ab-timeout",
        type=float,
        default=900.0,
        help="seconds the candidate's blind A/B may take before the demo reports it undecided",
    )
    p.add_argument(
        "--exit-after-loop",
        action="store_true",
        help="stop everything after the summary instead of serving until Ctrl-C",
    )
    a = p.parse_args(argv)
    if a.annotators < 1 or a.votes < 1 or a.steps < 1:
        p.error("--annotators, --votes and --steps must be at least 1")
    try:
        a.taste = TasteMix.parse(a.taste, noise=a.noise)
    except ValueError as exc:
        p.error(f"--noise: {exc}")

    if not port_is_free(a.port):
        print(f"port {a.port} is in use: stop what runs there or pass --port", file=sys.stderr)
        return 2
    data_dir = a.data_dir.expanduser().resolve()
    url = f"http://127.0.0.1:{a.port}"
    password = admin_password(data_dir)
    env = dict(os.environ)
    env.update(
        PREFLOOP_DATA_DIR=str(data_dir),
        PREFLOOP_HOST="127.0.0.1",
        PREFLOOP_PORT=str(a.port),
        PREFLOOP_ADMIN_PASSWORD=password,
        HF_HUB_OFFLINE="1",
        GRADIO_ANALYTICS_ENABLED="False",
        PYTHONUNBUFFERED="1",
    )
    env.setdefault("PREFLOOP_PAIR_POOL_TARGET", str(DEMO_POOL_TARGET))
    # Half the served pairs are A/B pairs while a candidate is judged (the product's default is
    # a quarter), so that the demo's decision comes in a few minutes on a CPU.
    env.setdefault("PREFLOOP_AB_SHARE", DEMO_AB_SHARE)
    env.setdefault("PREFLOOP_LOG_JSON", "false")
    for key in (
        "PREFLOOP_DATA_DIR",
        "PREFLOOP_PORT",
        "PREFLOOP_ADMIN_PASSWORD",
        "PREFLOOP_PAIR_POOL_TARGET",
        "PREFLOOP_LOG_JSON",
        "PREFLOOP_AB_SHARE",
    ):
        os.environ[key] = env[key]  # this process's settings match its children's

    from backend.migrate import upgrade
    from backend.settings import get_settings

    get_settings.cache_clear()
    settings = get_settings()
    if not settings.is_local:
        print(
            "prefloop demo runs in local mode (SQLite); unset PREFLOOP_DATABASE_URL",
            file=sys.stderr,
        )
        return 2
    print(f"prefloop demo: data in {data_dir}")
    upgrade(settings.db_url)
    print("database at head")

    children = Children(env=env, log_dir=data_dir / "logs")
    try:
        with _terminate_on_sigterm():
            return _run(a, url, settings, password, children)
    except KeyboardInterrupt:
        print("\nstopping...")
        return 130
    except RuntimeError as exc:
        print(f"prefloop demo: {exc}", file=sys.stderr)
        return 1
    finally:
        children.stop()
        print("all processes stopped")


def _run(a: argparse.Namespace, url: str, settings: Any, password: str, children: Children) -> int:
    celery = ["-m", "celery", "-A", "worker.celery_app"]
    children.start("server", ["-m", "backend.cli", "serve"])
    for name, queues in LOCAL_WORKERS.items():
        children.start(
            name,
            [
                *celery,
                "worker",
                "-Q",
                queues,
                "--pool=solo",
                "--loglevel=INFO",
                "--without-gossip",
                "--without-mingle",
                "--hostname",
                f"demo-{name}@%h",
            ],
        )
    children.start("beat", [*celery, "beat", "--loglevel=INFO"])
    workers = ", ".join(LOCAL_WORKERS)
    print(f"server, workers ({workers}) and beat started; logs in {children.log_dir}")

    # The first pool refill now rather than at beat's first tick.
    from worker.celery_app import create_celery

    create_celery(settings).send_task(GENERATE_PAIRS)
    wait_for_health(url, children)
    print(f"\nPrefloop is up at {url}/")
    print(f"admin account: username {settings.admin_username!r}, password {password!r}\n")

    api = Admin.sign_in(url, settings.admin_username, password)
    try:
        print(
            f"{a.annotators} simulated annotators are voting ({a.votes} votes, label noise "
            f"{a.noise}); the first pairs appear once the worker has sampled them..."
        )
        print(f"annotators' taste: {a.taste.describe()}")
        started = time.monotonic()
        ready = wait_for_pairs(settings, children, a.vote_timeout)
        print(f"{ready} pairs ready after {time.monotonic() - started:.0f} s")
        votes = run_annotators(url, a.votes, a.annotators, a.noise, a.vote_timeout, a.taste)
        print(
            f"collected {votes.get('votes', 0)} votes in {time.monotonic() - started:.0f} s: "
            + ", ".join(f"{k}={v}" for k, v in sorted(votes.items()) if k != "votes")
        )
        if votes.get("votes", 0) == 0:
            raise RuntimeError("no votes were collected; see the worker log")

        # Learning rate, beta, rank and batch are the built-in family's round defaults
        # (backend.round_config.FAMILY_DEFAULTS: the alignment benchmark's tuned values).
        config = {
            "steps": a.steps,
            "eval_prompts": a.eval_prompts,
            "checkpoint_every": max(1, a.steps // 4),
        }
        round_id = api.client.start_round(api.token, config)
        print(f"training round {round_id} queued ({a.steps} steps)")
        rnd = follow_round(api, round_id, children)
        if rnd["status"] != "succeeded":
            print(f"round {round_id} {rnd['status']}: {rnd.get('error')}")
            rows = [
                ("votes", str(votes.get("votes", 0))),
                ("round", rnd["status"]),
                ("error", str(rnd.get("error"))),
            ]
            print(summary_table(rows))
        else:
            m = rnd["metrics"]
            rows = [
                ("votes collected", str(votes.get("votes", 0))),
                ("training pairs", f"{m.get('pairs')} (+ {m.get('heldout_pairs')} held out)"),
                (
                    "steps",
                    f"{m.get('steps')} of {m.get('steps_requested')} requested "
                    f"({m.get('epochs')} epochs at most); best at step {m.get('best_step')}"
                    + (f"; {m['stop_reason']}" if m.get("stop_reason") else ""),
                ),
            ]
            best = m.get("heldout_best") or {}
            if best:
                rows.append(
                    (
                        "held-out (best)",
                        f"accuracy {_fmt(best.get('accuracy'), 3)}, loss "
                        f"{_fmt(best.get('loss'))}, drift {_fmt(best.get('drift'), 3)}",
                    )
                )
            rows.append(("train seconds", _fmt(m.get("train_seconds"), 1)))
            if m.get("candidate") is False:
                rows.append(("candidate", f"none: {m.get('no_candidate_reason')}"))
            else:
                vid = rnd["version_id"]
                rows += [
                    ("judge, parent", _fmt(m.get("judge_parent"))),
                    ("judge, candidate", _fmt(m.get("judge_new"))),
                    (
                        "judge change (± sem)",
                        f"{_fmt(m.get('judge_delta'))} ± {_fmt(m.get('judge_delta_sem'))}",
                    ),
                    ("validation grid", f"{url}/api/v1/versions/{vid}/samples (admin)"),
                ]
                if m.get("policy_action") == "ab_gate":
                    print(
                        f"candidate version {vid} faces its parent in blind A/B: the pool "
                        "serves candidate-vs-parent pairs and the same annotators vote..."
                    )
                    ab = ab_phase(a, api, url, vid, settings, children)
                    gate = ab.get("gate") or {}
                    lo, hi = (gate.get("interval") or [None, None])[:2]
                    rows += [
                        (
                            "A/B votes",
                            f"{gate.get('battles')}: {gate.get('wins')} wins, "
                            f"{gate.get('losses')} losses, {gate.get('ties')} ties",
                        ),
                        (
                            "A/B win rate [95% CI]",
                            f"{_fmt(gate.get('win_rate'), 3)} [{_fmt(lo, 3)}, {_fmt(hi, 3)}]",
                        ),
                        ("A/B decision", str(gate.get("reason") or gate.get("state"))),
                    ]
                    status = ab.get("status")
                else:
                    status = "published" if m.get("published") else "candidate"
                    rows.append(("publish policy", f"{m.get('policy_reason')}"))
                rows.append(("new version", f"{vid} ({status})"))
            print(summary_table(rows))
    finally:
        api.close()

    if a.exit_after_loop:
        return 0 if rnd["status"] == "succeeded" else 1
    print(f"\nstill serving at {url}/ (annotate there yourself); Ctrl-C to stop")
    while True:
        children.check_alive()
        time.sleep(1.0)


if __name__ == "__main__":
    raise SystemExit(main())
