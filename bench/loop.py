"""``python -m bench.loop``: the whole loop, timed per phase, from votes to serving.

One machine, the real processes: the API server (``python -m backend.cli serve``) and a Celery
worker on every queue (``-Q sample,train,cpu``, ``--pool=solo``) on SQLite and the embedded broker, in a temporary data
directory. Simulated annotators (:mod:`clients.simulated_annotator`, taste
:data:`worker.shapes.tastes.DEMO_MIX`, 10% label noise) vote through the public HTTP API. The
phases, each timed on the wall clock:

1. **start**: the server and the worker up (``/healthz``);
2. **pool fill**: the first ``pairs.generate``;
3. **training votes**: the annotators vote until ``--votes`` votes are in (the pool is refilled
   whenever it runs dry);
4. **round**: ``POST /rounds`` to a succeeded round with a candidate (training, the judge's
   evaluation against the parent, the validation grid), and its A/B gate opened by the
   ``human`` publish policy;
5. **A/B pairs**: the ``pairs.generate`` that adds the candidate-vs-parent pairs;
6. **A/B decision**: the annotators keep voting on whatever they are served (about
   ``--ab-share`` of it A/B pairs) until ``GET /versions/{id}/ab`` leaves ``open``; the API
   checks the sequential test after every A/B vote and acts on it (publish on promote, retire
   on reject);
7. **serving**: after a promote, the ``pairs.generate`` that fills the pool from the new
   version, until an annotator is served one of its pairs; after a reject, until the pool holds
   none of the candidate's pairs.

It prints the table and the candidate's A/B result (state, battles, win rate with its 95%
interval, the test's reason and what the policy did).

``--quick`` (under 2 minutes): a tiny built-in model (untrained, 4 sampling steps; the same code
path as ``builtin:shapes``), 40 training votes, a 4-step round, and the A/B test at
``min_effect`` 0.3 (a handful of votes decide). Without it: the shipped ``builtin:shapes``
checkpoint, 150 votes by 3 annotators (each pair voted 3 times), a 40-step round and the
default A/B settings (alpha 0.05, min_effect 0.1, budget 400, power 0.9).

The round runs with ``holdout_fraction`` 0, so that it always yields a candidate to put through
the A/B phase (with held-out votes a round that learns nothing makes no candidate at all).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backend.queues import ALL_QUEUES

REPO_ROOT = Path(__file__).resolve().parent.parent
ADMIN_PASSWORD = "bench-loop-admin-password"
TASK_TIMEOUT_S = 900.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_tiny_checkpoint(path: Path) -> Path:
    """An untrained built-in model with small channels and 4 sampling steps (the tests' one)."""
    from worker.shapes.model import BuiltinConfig, build_builtin, save_builtin

    cfg = BuiltinConfig(
        block_out_channels=(16, 32, 32),
        attention_heads=2,
        text_hidden_size=32,
        text_layers=1,
        text_heads=2,
        num_inference_steps=4,
        seed=0,
    )
    save_builtin(build_builtin(cfg), path)
    return path


# ---------------------------------------------------------------------------- the stack
@dataclass
class LoopStack:
    """The API server and a Celery worker on a fresh SQLite data directory, and the helpers
    to drive them: admin calls over HTTP, tasks by name, database reads for checks.

    ``settings`` (``PREFLOOP_*`` names without the prefix, as strings) reach both processes.
    """

    data_dir: Path
    base_model: str
    settings: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    children: Any = None
    api: Any = None
    db: Any = None
    celery: Any = None
    url: str = ""

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFLOOP_")}
        env.update(
            PREFLOOP_DATA_DIR=str(self.data_dir),
            PREFLOOP_BASE_MODEL=self.base_model,
            PREFLOOP_HOST="127.0.0.1",
            PREFLOOP_PORT=str(self.port),
            PREFLOOP_ADMIN_PASSWORD=ADMIN_PASSWORD,
            PREFLOOP_LOG_JSON="false",
            PREFLOOP_LOG_LEVEL="INFO",
            HF_HUB_OFFLINE="1",
            GRADIO_ANALYTICS_ENABLED="False",
            OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
            PYTHONUNBUFFERED="1",
        )
        env.update({f"PREFLOOP_{k.upper()}": str(v) for k, v in self.settings.items()})
        return env

    def start(self) -> None:
        from backend.db import Database
        from backend.migrate import upgrade
        from backend.settings import Settings
        from clients.demo import Admin, Children, wait_for_health
        from worker.celery_app import create_celery

        self.data_dir.mkdir(parents=True, exist_ok=True)
        db_url = f"sqlite:///{self.data_dir / 'prefloop.db'}"
        upgrade(db_url)
        self.url = f"http://127.0.0.1:{self.port}"
        self.children = Children(env=self.env(), log_dir=self.data_dir / "logs")
        self.children.start("server", ["-m", "backend.cli", "serve"])
        self.children.start(
            "worker",
            [
                "-m",
                "celery",
                "-A",
                "worker.celery_app",
                "worker",
                "-Q",
                ALL_QUEUES,
                "--pool=solo",
                "--loglevel=INFO",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "--hostname",
                f"bench-loop-{self.port}@%h",
            ],
        )
        self.celery = create_celery(Settings(data_dir=self.data_dir, database_url=db_url))
        self.db = Database(db_url, pool_size=2, max_overflow=2)
        wait_for_health(self.url, self.children)
        self.api = Admin.sign_in(self.url, "admin", ADMIN_PASSWORD)

    def stop(self) -> None:
        if self.api is not None:
            self.api.close()
        if self.children is not None:
            self.children.stop()
        if self.db is not None:
            self.db.dispose()

    def task(self, name: str, *args: Any, timeout: float = TASK_TIMEOUT_S) -> Any:
        """Run a task on the worker, by name, and wait for its result."""
        self.children.check_alive()
        return self.celery.send_task(name, args=list(args)).get(timeout=timeout)

    def refill(self) -> int:
        from backend.queues import GENERATE_PAIRS

        return int(self.task(GENERATE_PAIRS))

    def follow_round(self, round_id: int, timeout: float = TASK_TIMEOUT_S) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.children.check_alive()
            rnd = self.api.client.get_round(self.api.token, round_id)
            if rnd["status"] in ("succeeded", "failed", "cancelled"):
                return dict(rnd)
            time.sleep(0.5)
        raise RuntimeError(f"round {round_id} did not finish in {timeout:.0f} s")

    def ab(self, version_id: int) -> dict[str, Any]:
        return self.api.client.version_ab(self.api.token, version_id)

    def image_versions(self, image_ids: list[int]) -> dict[int, int]:
        from sqlalchemy import select

        from backend.models import Image

        with self.db.read_session() as s:
            return dict(
                s.execute(select(Image.id, Image.version_id).where(Image.id.in_(image_ids))).all()
            )

    def log_tail(self, name: str, chars: int = 3000) -> str:
        child = next(c for c in self.children.children if c.name == name)
        return str(child.log_text()[-chars:])


@contextmanager
def loop_stack(
    data_dir: Path, base_model: str, settings: dict[str, str] | None = None
) -> Iterator[LoopStack]:
    stack = LoopStack(data_dir, base_model, dict(settings or {}))
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


# ---------------------------------------------------------------------------- voting
def vote_until(
    stack: LoopStack,
    annotators: list[Any],
    done: Callable[[int], bool],
    *,
    max_seconds: float,
    max_dry_refills: int = 3,
) -> dict[str, int]:
    """Annotators take turns voting (``annotator.step()``: one pair, one vote) until
    ``done(votes so far)``; when none is served a pair, the pool is refilled. Returns counts:
    votes, refills, empty polls."""
    counts = {"votes": 0, "refills": 0, "empty": 0}
    deadline = time.monotonic() + max_seconds
    dry = 0
    while not done(counts["votes"]):
        if time.monotonic() > deadline:
            raise RuntimeError(f"voting took more than {max_seconds:.0f} s ({counts})")
        voted = 0
        for ann in annotators:
            if ann.step() is not None:
                voted += 1
                counts["votes"] += 1
                if done(counts["votes"]):
                    break
        if voted == 0:
            counts["empty"] += 1
            made = stack.refill()
            counts["refills"] += 1
            dry = dry + 1 if made == 0 else 0
            if dry > max_dry_refills:
                raise RuntimeError(f"no pairs to vote on after {dry} refills ({counts})")
    return counts


# ---------------------------------------------------------------------------- the benchmark
@dataclass
class Phase:
    name: str
    seconds: float
    detail: str


def _fmt_rate(gate: dict[str, Any]) -> str:
    if gate.get("win_rate") is None:
        return "no votes"
    lo, hi = gate["interval"]
    return f"{gate['win_rate']:.3f} [{lo:.3f}, {hi:.3f}]"


def run(args: argparse.Namespace) -> dict[str, Any]:
    from clients.simulated_annotator import SimulatedAnnotator
    from worker.shapes.tastes import DEMO_MIX, TasteMix

    work = Path(tempfile.mkdtemp(prefix="prefloop-bench-loop-"))
    phases: list[Phase] = []
    started = time.monotonic()

    def timed(name: str) -> Callable[[str], None]:
        t0 = time.monotonic()

        def finish(detail: str) -> None:
            phases.append(Phase(name, time.monotonic() - t0, detail))
            print(f"  {name}: {phases[-1].seconds:.1f} s ({detail})", flush=True)

        return finish

    if args.quick:
        base_model = str(build_tiny_checkpoint(work / "tiny-shapes"))
        model_desc = "tiny built-in model (untrained, 4 sampling steps)"
    else:
        base_model = "builtin:shapes"
        model_desc = "builtin:shapes (shipped checkpoint)"
    settings = {
        "pair_pool_target": str(args.pool),
        "pair_overlap": str(args.overlap),
        "gold_fraction": "0",
        "ab_share": str(args.ab_share),
        "ab_min_effect": str(args.min_effect),
        "ab_alpha": str(args.alpha),
        "ab_budget": str(args.budget),
        "publish_policy": "human",
    }
    result: dict[str, Any] = {"model": model_desc, "settings": settings}
    try:
        finish = timed("start (server + worker)")
        with loop_stack(work / "data", base_model, settings) as stack:
            finish(f"API on :{stack.port}, worker -Q {ALL_QUEUES}")
            taste = TasteMix.parse(DEMO_MIX, noise=args.noise)
            annotators = [
                SimulatedAnnotator(
                    stack.url, f"sim-{i}", f"sim-{i}-password", taste=taste, seed=args.seed + i
                )
                for i in range(args.annotators)
            ]
            try:
                finish = timed("pool fill")
                made = stack.refill()
                finish(f"{made} pairs")

                finish = timed("training votes")
                c = vote_until(
                    stack, annotators, lambda n: n >= args.votes, max_seconds=args.max_seconds
                )
                finish(
                    f"{c['votes']} votes by {len(annotators)} annotators, {c['refills']} refills"
                )

                finish = timed("round (train + evaluate)")
                config = {
                    "steps": args.steps,
                    "eval_prompts": args.eval_prompts,
                    "holdout_fraction": 0.0,
                    "checkpoint_every": max(1, args.steps // 2),
                }
                round_id = stack.api.client.start_round(stack.api.token, config)
                rnd = stack.follow_round(round_id)
                m = rnd["metrics"]
                if rnd["status"] != "succeeded" or not rnd.get("version_id"):
                    finish(f"{rnd['status']}: {rnd.get('error') or m.get('no_candidate_reason')}")
                    raise RuntimeError(f"round {round_id} made no candidate: {rnd}")
                cand = int(rnd["version_id"])
                finish(
                    f"{m.get('steps')} steps on {m.get('pairs')} pairs, "
                    f"judge delta {m.get('judge_delta')}, policy {m.get('policy_action')}"
                )
                result["round"] = {k: m.get(k) for k in ("steps", "pairs", "judge_delta")}

                finish = timed("A/B pairs")
                made = stack.refill()
                finish(f"{made} pairs (A/B pairs for version {cand})")

                finish = timed("A/B votes to decision")
                polled = {"votes": -args.poll_every, "decided": False}

                def decided(votes: int) -> bool:
                    if votes - polled["votes"] >= args.poll_every:
                        polled["votes"] = votes
                        polled["decided"] = stack.ab(cand)["state"] != "open"
                    return bool(polled["decided"])

                c = vote_until(stack, annotators, decided, max_seconds=args.max_seconds)
                report = stack.ab(cand)
                gate = report["gate"]
                finish(
                    f"{gate['state']} after {gate['battles']} A/B votes "
                    f"({c['votes']} votes in all, {c['refills']} refills)"
                )

                finish = timed("decision -> serving")
                serving = _serving_phase(stack, annotators, cand, gate["state"], args.max_seconds)
                finish(serving)
                result["ab"] = report
            finally:
                for ann in annotators:
                    ann.close()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    result["phases"] = [vars(p) for p in phases]
    result["total_seconds"] = time.monotonic() - started
    return result


def _serving_phase(
    stack: LoopStack, annotators: list[Any], cand: int, state: str, max_seconds: float
) -> str:
    from prefloop_client import Pair as ServedPair

    deadline = time.monotonic() + max_seconds
    if state == "promote":
        made = stack.refill()
        while time.monotonic() < deadline:
            pair = annotators[0].client.next_pair(annotators[0].token)
            if isinstance(pair, ServedPair):
                ids = [int(pair.left.image_id), int(pair.right.image_id)]
                versions = set(stack.image_versions(ids).values())
                if versions == {cand}:
                    return f"published; refill made {made} pairs; a pair of version {cand} served"
            else:
                made = stack.refill()
        raise RuntimeError("the new version's pairs were never served")
    from sqlalchemy import func, select

    from backend.models import Pair

    made = stack.refill()
    with stack.db.read_session() as s:
        left = s.scalar(
            select(func.count())
            .select_from(Pair)
            .where(Pair.active.is_(True), Pair.ab_test_id.is_not(None))
        )
    return f"{state}: the parent keeps serving; {left} A/B pairs left after a {made}-pair refill"


def print_report(result: dict[str, Any]) -> None:
    rows = [(p["name"], f"{p['seconds']:.1f}", p["detail"]) for p in result["phases"]]
    rows.append(("total", f"{result['total_seconds']:.1f}", ""))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    print(f"\nbench.loop: {result['model']}, on this machine ({os.cpu_count()} CPUs)\n")
    print(f"{'phase'.ljust(w0)} | {'seconds'.rjust(max(w1, 7))} | detail")
    print(f"{'-' * w0}-|-{'-' * max(w1, 7)}-|-------")
    for name, secs, detail in rows:
        print(f"{name.ljust(w0)} | {secs.rjust(max(w1, 7))} | {detail}")
    ab = result.get("ab")
    if ab:
        gate = ab["gate"]
        s = gate["settings"]
        print(
            f"\nA/B result: version {ab['version_id']} ({ab['name']}) against its parent, "
            f"version {ab['parent_id']}:"
        )
        print(f"  state:     {gate['state']}  (policy {gate['policy']}; action: {gate['action']})")
        print(
            f"  battles:   {gate['battles']}  (wins {gate['wins']}, losses {gate['losses']}, "
            f"ties {gate['ties']}; {gate['votes_after_decision']} late votes not counted)"
        )
        print(f"  win rate:  {_fmt_rate(gate)}  (95% Wilson interval)")
        print(
            f"  test:      alpha {s['alpha']}, min_effect {s['min_effect']}, "
            f"budget {s['budget']}, power {s['power']}"
        )
        print(f"  reason:    {gate['reason']}")
        print(f"  version now: {ab['status']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.loop",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="tiny model, few votes: under 2 minutes")
    p.add_argument("--votes", type=int, default=None, help="training votes (quick 40, full 150)")
    p.add_argument("--annotators", type=int, default=3)
    p.add_argument("--overlap", type=int, default=None, help="votes per pair (quick 1, full 3)")
    p.add_argument("--pool", type=int, default=None, help="pair pool target (quick 16, full 48)")
    p.add_argument("--steps", type=int, default=None, help="round steps (quick 4, full 40)")
    p.add_argument("--eval-prompts", type=int, default=None, help="judge prompts (4 / 16)")
    p.add_argument("--ab-share", type=float, default=0.25)
    p.add_argument("--min-effect", type=float, default=None, help="A/B δ (quick 0.3, full 0.1)")
    p.add_argument("--alpha", type=float, default=0.05)
    p.add_argument("--budget", type=int, default=400)
    p.add_argument("--noise", type=float, default=0.1, help="annotators' label noise")
    p.add_argument("--poll-every", type=int, default=1, help="votes between A/B polls")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-seconds", type=float, default=1800.0, help="per voting phase")
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    p.add_argument("--keep", action="store_true", help="keep the temporary data directory")
    a = p.parse_args(argv)
    quick = a.quick
    for name, q, full in [
        ("votes", 40, 150),
        ("overlap", 1, 3),
        ("pool", 16, 48),
        ("steps", 4, 40),
        ("eval_prompts", 4, 16),
        ("min_effect", 0.3, 0.1),
    ]:
        if getattr(a, name) is None:
            setattr(a, name, q if quick else full)
    print(f"bench.loop ({'quick' if quick else 'full'}): starting the stack...", flush=True)

    def on_sigterm(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # so that the stack's finally stops the server and the worker

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        result = run(a)
    except RuntimeError as exc:
        print(f"bench.loop: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench.loop: interrupted; the server and the worker were stopped", file=sys.stderr)
        return 130
    print_report(result)
    if a.json is not None:
        a.json.write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
