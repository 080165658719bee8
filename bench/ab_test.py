"""Simulation study of the candidate-vs-parent A/B gate (``backend/ab_test.py``).

    python -m bench.ab_test                 # the full study: 1,000 runs per true win rate
    python -m bench.ab_test --quick         # 200 runs per true win rate (indicative, seconds)
    python -m bench.ab_test --runs 1000 --rates 0.5,0.55,0.6,0.7 --tie-rates 0,0.1 \\
        --alpha 0.05 --min-effect 0.1 --budget 400 --power 0.9 \\
        --live-rates 0.5,0.45,0.4,0.3 --live-votes 2000 --seed 0 --out bench/out

What it does (``docs/ab-test.md`` has the method and the measured tables):

1. **Promotion gate.** For each tie rate and each true win rate ``m`` (ties counting half), it
   draws ``--runs`` independent vote sequences of ``--budget`` votes: a tie with probability
   ``tie rate``, a candidate win with ``m - tie rate / 2``, a loss otherwise. The test's
   statistic is followed vote by vote (vectorised with numpy) to the first vote at which
   :func:`backend.ab_test.decide` leaves ``open``; the state reported is ``decide``'s own on the
   tally at that vote, and ``decide`` is also checked to be ``open`` one vote earlier, so the
   table measures the backend's function, not a re-implementation. Reported: P(promote) with a
   95% Wilson interval over the runs, P(reject), P(inconclusive), and the mean and median votes
   to the decision (``budget`` for inconclusive runs).
2. **Live monitor.** For each tie rate and each live win rate it draws ``--runs`` sequences of
   ``--live-votes`` votes and finds the first vote at which :func:`backend.ab_test.live_check`
   turns True (checked the same way). Reported: P(rollback) within ``budget`` votes and within
   ``--live-votes`` votes, and the median votes to a rollback. At 0.5 this is the false-rollback
   rate (bounded by alpha for any horizon); below 0.5 it is the power.

Results: tables on stdout; ``ab_test.json`` under ``--out`` when given. numpy only (no torch).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from backend.ab_test import (
    ABSettings,
    ABTally,
    decide,
    live_check,
    live_grid,
    wilson_interval,
)
from bench.report import fmt, format_table

RATES: tuple[float, ...] = (0.5, 0.55, 0.6, 0.7)
LIVE_RATES: tuple[float, ...] = (0.5, 0.45, 0.4, 0.3)
TIE_RATES: tuple[float, ...] = (0.0, 0.1)
_TOL = 1e-9  # the same boundary tolerance as backend.ab_test


@dataclass(frozen=True)
class StudySettings:
    """Everything the study depends on. The defaults are the full study's."""

    runs: int = 1000
    rates: tuple[float, ...] = RATES
    tie_rates: tuple[float, ...] = TIE_RATES
    live_rates: tuple[float, ...] = LIVE_RATES
    live_votes: int = 2000
    seed: int = 0
    ab: ABSettings = ABSettings()

    def __post_init__(self) -> None:
        if self.runs < 1:
            raise ValueError(f"runs must be >= 1, got {self.runs}")
        if self.live_votes < 1:
            raise ValueError(f"live_votes must be >= 1, got {self.live_votes}")
        for t in self.tie_rates:
            if not 0.0 <= t < 1.0:
                raise ValueError(f"tie rate must be in [0, 1), got {t}")
            for m in (*self.rates, *self.live_rates):
                if not (t / 2 <= m <= 1 - t / 2):
                    raise ValueError(f"win rate {m} is impossible with tie rate {t}")


QUICK = {"runs": 200}


# ============================================================================ simulation
def draw_votes(
    rng: np.random.Generator, m: float, tie_rate: float, runs: int, votes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative (wins, losses, ties) after each vote, each of shape (runs, votes), int32."""
    u = rng.random((runs, votes))
    p_win = m - tie_rate / 2.0
    win = u < p_win
    tie = (u >= p_win) & (u < p_win + tie_rate)
    loss = ~(win | tie)
    return (
        np.cumsum(win, axis=1, dtype=np.int32),
        np.cumsum(loss, axis=1, dtype=np.int32),
        np.cumsum(tie, axis=1, dtype=np.int32),
    )


def _tally(w: np.ndarray, lo: np.ndarray, t: np.ndarray, run: int, k: int) -> ABTally:
    """The tally of ``run`` after ``k`` votes (k >= 0)."""
    if k == 0:
        return ABTally()
    return ABTally(int(w[run, k - 1]), int(lo[run, k - 1]), int(t[run, k - 1]))


def _first_true(hit: np.ndarray) -> np.ndarray:
    """1-based index of the first True per row; 0 where none."""
    anyhit = hit.any(axis=1)
    return np.where(anyhit, hit.argmax(axis=1) + 1, 0)


def simulate_gate(
    ab: ABSettings, m: float, tie_rate: float, runs: int, rng: np.random.Generator
) -> dict[str, Any]:
    """Run the promotion gate ``runs`` times at true win rate ``m``; the states are decide()'s."""
    w, lo, t = draw_votes(rng, m, tie_rate, runs, ab.budget)
    s = w + 0.5 * t
    f = lo + 0.5 * t
    llr = s * ab.log_win + f * ab.log_loss
    crossed = (llr >= ab.log_upper - _TOL) | (llr <= ab.log_lower + _TOL)
    stop = _first_true(crossed)
    stop = np.where(stop == 0, ab.budget, stop)
    states: list[str] = []
    for r in range(runs):
        k = int(stop[r])
        d = decide(_tally(w, lo, t, r, k), ab)
        if d.state == "open" or decide(_tally(w, lo, t, r, k - 1), ab).state != "open":
            raise AssertionError(f"simulation and decide() disagree on run {r} at vote {k}")
        states.append(d.state)
    st = np.array(states)
    n_promote = int((st == "promote").sum())
    ci = wilson_interval(n_promote, runs)
    return {
        "true_rate": m,
        "tie_rate": tie_rate,
        "runs": runs,
        "p_promote": n_promote / runs,
        "p_promote_ci": list(ci),
        "p_reject": float((st == "reject").mean()),
        "p_inconclusive": float((st == "inconclusive").mean()),
        "mean_votes": float(stop.mean()),
        "median_votes": float(np.median(stop)),
        "p90_votes": float(np.percentile(stop, 90)),
    }


def simulate_live(
    ab: ABSettings, m: float, tie_rate: float, runs: int, horizon: int, rng: np.random.Generator
) -> dict[str, Any]:
    """Run the live monitor ``runs`` times for ``horizon`` votes at true win rate ``m``."""
    w, lo, t = draw_votes(rng, m, tie_rate, runs, horizon)
    s = w + 0.5 * t
    f = lo + 0.5 * t
    acc = np.full(s.shape, -np.inf)
    grid = live_grid(ab)
    for q in grid:
        acc = np.logaddexp(acc, s * math.log(2.0 * q) + f * math.log(2.0 * (1.0 - q)))
    acc -= math.log(len(grid))
    stop = _first_true(acc >= ab.log_upper - _TOL)
    for r in range(runs):
        k = int(stop[r])
        if k and (
            not live_check(_tally(w, lo, t, r, k), ab) or live_check(_tally(w, lo, t, r, k - 1), ab)
        ):
            raise AssertionError(f"simulation and live_check() disagree on run {r} at vote {k}")
        if not k and live_check(_tally(w, lo, t, r, horizon), ab):
            raise AssertionError(f"simulation and live_check() disagree on run {r} at the end")
    rolled = stop > 0
    within_budget = rolled & (stop <= ab.budget)
    return {
        "true_rate": m,
        "tie_rate": tie_rate,
        "runs": runs,
        "horizon": horizon,
        "p_rollback_budget": float(within_budget.mean()),
        "p_rollback": float(rolled.mean()),
        "p_rollback_ci": list(wilson_interval(int(rolled.sum()), runs)),
        "median_votes_to_rollback": float(np.median(stop[rolled])) if rolled.any() else None,
    }


# ============================================================================ exact
def _step(alive: np.ndarray, p_win: float, p_tie: float, p_loss: float) -> np.ndarray:
    """One vote on the distribution of 2 * score (index k = 2 wins + ties) of running paths."""
    new = np.zeros(alive.size + 2)
    new[2:] += p_win * alive
    new[1:-1] += p_tie * alive
    new[:-2] += p_loss * alive
    return new


def _tally_nk(n: int, k: int) -> ABTally:
    """A tally of n votes with score k / 2 (the statistics depend on nothing else)."""
    wins, ties = divmod(k, 2)
    return ABTally(wins=wins, losses=n - wins - ties, ties=ties)


def _first_k(n: int, pred: Callable[[ABTally], bool]) -> int:
    """Smallest k in [0, 2n] with pred(tally(n, k)) (pred monotone False..True); 2n + 1 if none."""
    lo, hi = 0, 2 * n + 1
    while lo < hi:
        mid = (lo + hi) // 2
        if pred(_tally_nk(n, mid)):
            hi = mid
        else:
            lo = mid + 1
    return lo


@lru_cache(maxsize=8)
def gate_thresholds(ab: ABSettings) -> tuple[np.ndarray, np.ndarray]:
    """For n = 1..budget: decide() rejects at k < lower[n - 1] and promotes at k >= upper[n - 1]
    (k = 2 * score). Found by bisection on :func:`backend.ab_test.decide` itself (its statistic
    increases with the score at fixed n)."""
    lower = [
        _first_k(n, lambda t: decide(t, ab).state != "reject") for n in range(1, ab.budget + 1)
    ]
    upper = [
        _first_k(n, lambda t: decide(t, ab).state == "promote") for n in range(1, ab.budget + 1)
    ]
    return np.array(lower), np.array(upper)


@lru_cache(maxsize=8)
def live_thresholds(ab: ABSettings, horizon: int) -> np.ndarray:
    """For n = 1..horizon: live_check() is True at k < bound[n - 1] (k = 2 * score), by bisection
    on :func:`backend.ab_test.live_check` (its e-value decreases with the score at fixed n)."""
    return np.array([_first_k(n, lambda t: not live_check(t, ab)) for n in range(1, horizon + 1)])


def exact_gate(ab: ABSettings, m: float, tie_rate: float) -> dict[str, float]:
    """The gate's exact operating characteristic at true win rate ``m`` (independent votes).

    Dynamic programming over the distribution of the score of the runs still open: the
    statistic depends on (votes, wins + ties / 2) only, so after n votes there are 2n + 1 states.
    """
    p_win, p_tie = m - tie_rate / 2.0, tie_rate
    p_loss = 1.0 - p_win - p_tie
    lower, upper = gate_thresholds(ab)
    alive = np.ones(1)
    promote = reject = 0.0
    stop = np.zeros(ab.budget + 1)
    for n in range(1, ab.budget + 1):
        alive = _step(alive, p_win, p_tie, p_loss)
        lo, up = int(lower[n - 1]), int(upper[n - 1])
        p_up, p_down = float(alive[up:].sum()), float(alive[:lo].sum())
        promote += p_up
        reject += p_down
        stop[n] = p_up + p_down
        alive[up:] = 0.0
        alive[:lo] = 0.0
    inconclusive = float(alive.sum())
    stop[ab.budget] += inconclusive
    cdf = np.cumsum(stop)
    return {
        "p_promote": promote,
        "p_reject": reject,
        "p_inconclusive": inconclusive,
        "mean_votes": float((np.arange(ab.budget + 1) * stop).sum()),
        "median_votes": float(np.searchsorted(cdf, 0.5)),
    }


def exact_live(ab: ABSettings, m: float, tie_rate: float, horizon: int) -> dict[str, float]:
    """Exact P(rollback within ``budget`` votes) and within ``horizon`` votes at win rate m."""
    p_win, p_tie = m - tie_rate / 2.0, tie_rate
    p_loss = 1.0 - p_win - p_tie
    bound = live_thresholds(ab, horizon)
    alive = np.ones(1)
    rolled = 0.0
    within_budget = 0.0
    for n in range(1, horizon + 1):
        alive = _step(alive, p_win, p_tie, p_loss)
        b = int(bound[n - 1])
        rolled += float(alive[:b].sum())
        alive[:b] = 0.0
        if n == ab.budget:
            within_budget = rolled
    if horizon < ab.budget:
        within_budget = rolled
    return {"p_rollback_budget": within_budget, "p_rollback": rolled}


def run_study(settings: StudySettings) -> dict[str, Any]:
    t0 = time.perf_counter()
    gate: list[dict[str, Any]] = []
    live: list[dict[str, Any]] = []
    for i, tie in enumerate(settings.tie_rates):
        for j, m in enumerate(settings.rates):
            rng = np.random.default_rng([settings.seed, 0, i, j])
            row = simulate_gate(settings.ab, m, tie, settings.runs, rng)
            row["exact"] = exact_gate(settings.ab, m, tie)
            gate.append(row)
        for j, m in enumerate(settings.live_rates):
            rng = np.random.default_rng([settings.seed, 1, i, j])
            row = simulate_live(settings.ab, m, tie, settings.runs, settings.live_votes, rng)
            row["exact"] = exact_live(settings.ab, m, tie, settings.live_votes)
            live.append(row)
    return {
        "settings": {**asdict(settings), "ab": asdict(settings.ab)},
        "gate": gate,
        "live": live,
        "wall_seconds": time.perf_counter() - t0,
    }


# ============================================================================ report
def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def report(result: dict[str, Any]) -> str:
    s = result["settings"]
    ab = s["ab"]
    budget = ab["budget"]
    gate_headers = ["ties", "true rate", "P(promote)", "P(reject)", "P(inconclusive)"]
    lines = [
        f"A/B gate: alpha={ab['alpha']:g}, min_effect={ab['min_effect']:g}, budget={budget}, "
        f"power={ab['power']:g}; seed {s['seed']}",
        "",
        f"Simulation, {s['runs']} runs per row (95% Wilson interval of P(promote); votes to the "
        f"decision, {budget} when inconclusive):",
        "",
        format_table(
            [
                *gate_headers[:2],
                "P(promote) [95% CI]",
                *gate_headers[3:],
                "mean votes",
                "median",
                "p90",
            ],
            [
                [
                    _pct(g["tie_rate"]),
                    f"{g['true_rate']:g}",
                    f"{_pct(g['p_promote'])} [{_pct(g['p_promote_ci'][0])}, "
                    f"{_pct(g['p_promote_ci'][1])}]",
                    _pct(g["p_reject"]),
                    _pct(g["p_inconclusive"]),
                    fmt(g["mean_votes"], 1),
                    fmt(g["median_votes"], 0),
                    fmt(g["p90_votes"], 0),
                ]
                for g in result["gate"]
            ],
        ),
        "",
        "Exact (dynamic programming over the tally; no sampling error):",
        "",
        format_table(
            [*gate_headers, "mean votes", "median"],
            [
                [
                    _pct(g["tie_rate"]),
                    f"{g['true_rate']:g}",
                    _pct(g["exact"]["p_promote"]),
                    _pct(g["exact"]["p_reject"]),
                    _pct(g["exact"]["p_inconclusive"]),
                    fmt(g["exact"]["mean_votes"], 1),
                    fmt(g["exact"]["median_votes"], 0),
                ]
                for g in result["gate"]
            ],
        ),
        "",
        f"Live monitor (no budget; {s['live_votes']} live votes per run; sim = {s['runs']} runs):",
        "",
        format_table(
            [
                "ties",
                "true rate",
                f"P(rollback <= {budget}) sim",
                "exact",
                f"P(rollback <= {s['live_votes']}) sim [95% CI]",
                "exact",
                "median votes to rollback",
            ],
            [
                [
                    _pct(v["tie_rate"]),
                    f"{v['true_rate']:g}",
                    _pct(v["p_rollback_budget"]),
                    _pct(v["exact"]["p_rollback_budget"]),
                    f"{_pct(v['p_rollback'])} [{_pct(v['p_rollback_ci'][0])}, "
                    f"{_pct(v['p_rollback_ci'][1])}]",
                    _pct(v["exact"]["p_rollback"]),
                    fmt(v["median_votes_to_rollback"], 0),
                ]
                for v in result["live"]
            ],
        ),
        "",
        f"({result['wall_seconds']:.1f} s wall)",
    ]
    return "\n".join(lines)


# ============================================================================ CLI
def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def parse_args(argv: Sequence[str] | None) -> tuple[StudySettings, Path | None]:
    d = StudySettings()
    p = argparse.ArgumentParser(
        prog="python -m bench.ab_test", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--quick", action="store_true", help=f"{QUICK['runs']} runs per row")
    p.add_argument("--runs", type=int, help=f"runs per row (default {d.runs})")
    p.add_argument("--rates", type=_floats, help="true win rates of the gate study")
    p.add_argument("--tie-rates", type=_floats, help="fractions of votes that are ties")
    p.add_argument("--live-rates", type=_floats, help="true win rates of the live study")
    p.add_argument("--live-votes", type=int, help=f"live votes per run (default {d.live_votes})")
    p.add_argument("--alpha", type=float, help=f"(default {d.ab.alpha:g})")
    p.add_argument("--min-effect", type=float, help=f"(default {d.ab.min_effect:g})")
    p.add_argument("--budget", type=int, help=f"(default {d.ab.budget})")
    p.add_argument("--power", type=float, help=f"(default {d.ab.power:g})")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", type=Path, default=None, help="write ab_test.json here")
    a = p.parse_args(argv)
    ab_changes = {
        k: v
        for k, v in {
            "alpha": a.alpha,
            "min_effect": a.min_effect,
            "budget": a.budget,
            "power": a.power,
        }.items()
        if v is not None
    }
    changes: dict[str, Any] = dict(QUICK) if a.quick else {}
    changes.update(
        {
            k: v
            for k, v in {
                "runs": a.runs,
                "rates": a.rates,
                "tie_rates": a.tie_rates,
                "live_rates": a.live_rates,
                "live_votes": a.live_votes,
            }.items()
            if v is not None
        }
    )
    try:
        ab = ABSettings(**{**asdict(d.ab), **ab_changes})
        settings = StudySettings(**{**asdict(d), **changes, "seed": a.seed, "ab": ab})
    except ValueError as exc:
        p.error(str(exc))
    return settings, a.out


def main(argv: Sequence[str] | None = None) -> int:
    settings, out = parse_args(argv)
    result = run_study(settings)
    print(report(result))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "ab_test.json").write_text(json.dumps(result, indent=2))
        print(f"wrote {out / 'ab_test.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
