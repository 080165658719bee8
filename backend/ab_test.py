"""The candidate-vs-parent A/B gate: a sequential test checked after every blind vote.

Pure (standard library only; no numpy, torch, SQLAlchemy or FastAPI), so the API and the
worker call the same code. ``docs/ab-test.md`` has the method, its guarantees, the settings and
the simulation study (``python -m bench.ab_test``).

Observations. Each blind vote on a (candidate, parent) pair is, from the candidate's side, a
``win`` (1), a ``loss`` (0) or a ``tie`` (1/2: ties count half). ``both_bad`` and skips are not
observations. The *win rate* ``m`` is the mean observation, ``P(win) + P(tie) / 2``.

Promotion gate (:func:`decide`): Wald's sequential probability ratio test of ``m = 1/2``
against ``m = 1/2 + δ`` (δ = ``min_effect``), on the statistic

    log LR = s * log((1/2 + δ) / (1/2)) + f * log((1/2 - δ) / (1/2)),
    s = wins + ties / 2,  f = losses + ties / 2,

with boundaries chosen so that both error statements hold exactly (not only in Wald's
approximation), for any number of votes and whenever the test is looked at:

* ``promote`` when ``log LR >= log(1 / alpha)``. If every vote's conditional win rate given the
  votes before it is at most 1/2, P(ever promote) <= ``alpha`` (Ville's inequality: LR is a
  non-negative supermartingale under that hypothesis, ties included, because the per-vote factor
  is convex in the observation).
* ``reject`` when ``log LR <= log(1 - power)``. If every vote's conditional win rate is at
  least ``1/2 + δ``, P(ever reject) <= ``1 - power`` (the same argument applied to 1/LR).
* ``inconclusive`` when ``budget`` votes are in and neither boundary has been reached;
  ``open`` before.

Live monitor (:func:`live_check`): after publishing, a smaller share of traffic keeps comparing
the version with its parent, with no vote budget. :func:`live_check` says whether the version is
significantly *worse*: a mixture e-process for ``m >= 1/2`` against ``m < 1/2`` (an equal-weight
mixture of likelihood ratios over a grid of win rates in ``[1/2 - 2δ, 1/2)``); True once it
reaches ``1 / alpha``. If the version is not worse (every conditional win rate >= 1/2), P(ever
True) <= ``alpha``, however long the monitor runs.

Both statistics depend on the tally only (wins, losses, ties), not on the order of the votes, and
cost a few floating-point operations, so they are recomputed after every vote.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from statistics import NormalDist
from typing import Literal

__all__ = [
    "DEFAULT_SETTINGS",
    "LIVE_GRID_POINTS",
    "ABDecision",
    "ABSettings",
    "ABState",
    "ABTally",
    "Outcome",
    "decide",
    "live_check",
    "live_grid",
    "live_log_evalue",
    "sprt_log_lr",
    "wilson_interval",
]

ABState = Literal["open", "promote", "reject", "inconclusive"]
Outcome = Literal["win", "loss", "tie", "both_bad", "skip"] | float | int | None

#: Number of alternative win rates in the live monitor's mixture.
LIVE_GRID_POINTS = 20
#: A statistic within this distance (in log units) of a boundary counts as on it (float noise).
_BOUNDARY_TOL = 1e-9
#: Outcome labels that are not observations.
_NOT_OBSERVED = frozenset({"both_bad", "skip"})


# ============================================================================ settings
def _check_fraction(name: str, value: object, *, upper: float = 1.0) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not (0.0 < v < upper):
        raise ValueError(f"{name} must be strictly between 0 and {upper:g}, got {value!r}")
    return v


@dataclass(frozen=True)
class ABSettings:
    """The A/B gate's settings (``PREFLOOP_AB_*``; see ``docs/ab-test.md``).

    Attributes:
        alpha: the false-promotion rate: a candidate no better than its parent (win rate
            <= 1/2) is promoted with probability at most ``alpha``. Also the live monitor's
            false-rollback rate. In (0, 1).
        min_effect: δ, the smallest improvement that must be detectable: the test has its
            stated power against a win rate of ``1/2 + min_effect``. In (0, 1/2).
        budget: the vote budget: with this many votes in and no decision, the result is
            ``inconclusive``. An integer >= 1.
        power: a candidate whose win rate is at least ``1/2 + min_effect`` is rejected with
            probability at most ``1 - power``; its probability of promotion is at least
            ``power`` minus its probability of running out of budget (small at the default
            budget: ``docs/ab-test.md``). In (0, 1).
    """

    alpha: float = 0.05
    min_effect: float = 0.1
    budget: int = 400
    power: float = 0.9

    def __post_init__(self) -> None:
        _check_fraction("alpha", self.alpha)
        _check_fraction("min_effect", self.min_effect, upper=0.5)
        _check_fraction("power", self.power)
        if isinstance(self.budget, bool) or not isinstance(self.budget, int):
            raise ValueError(f"budget must be an integer, got {self.budget!r}")
        if self.budget < 1:
            raise ValueError(f"budget must be at least 1, got {self.budget!r}")

    @property
    def log_upper(self) -> float:
        """The promotion boundary on ``log LR``: ``log(1 / alpha)``."""
        return -math.log(self.alpha)

    @property
    def log_lower(self) -> float:
        """The rejection boundary on ``log LR``: ``log(1 - power)`` (negative)."""
        return math.log1p(-self.power)

    @property
    def log_win(self) -> float:
        """``log LR`` added by a win: ``log((1/2 + δ) / (1/2)) = log(1 + 2δ)``."""
        return math.log1p(2.0 * self.min_effect)

    @property
    def log_loss(self) -> float:
        """``log LR`` added by a loss: ``log((1/2 - δ) / (1/2)) = log(1 - 2δ)``; a tie adds half
        of a win's plus half of a loss's."""
        return math.log1p(-2.0 * self.min_effect)


DEFAULT_SETTINGS = ABSettings()


# ============================================================================ tally
@dataclass(frozen=True)
class ABTally:
    """Votes so far, from the candidate's side. Immutable; :meth:`record` returns a new tally."""

    wins: int = 0
    losses: int = 0
    ties: int = 0

    def __post_init__(self) -> None:
        for name in ("wins", "losses", "ties"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{name} must be an integer, got {v!r}")
            if v < 0:
                raise ValueError(f"{name} must be non-negative, got {v!r}")

    @property
    def votes(self) -> int:
        """Observations: wins + losses + ties."""
        return self.wins + self.losses + self.ties

    @property
    def score(self) -> float:
        """The candidate's points, ties counting half: ``wins + ties / 2``."""
        return self.wins + 0.5 * self.ties

    @property
    def win_rate(self) -> float | None:
        """``score / votes``; None before the first vote."""
        return self.score / self.votes if self.votes else None

    def record(self, outcome: Outcome) -> ABTally:
        """This tally plus one outcome (see :meth:`from_outcomes` for the accepted values)."""
        kind = _classify(outcome)
        if kind is None:
            return self
        return ABTally(
            wins=self.wins + (kind == "win"),
            losses=self.losses + (kind == "loss"),
            ties=self.ties + (kind == "tie"),
        )

    @classmethod
    def from_outcomes(cls, outcomes: Iterable[Outcome]) -> ABTally:
        """Count outcomes: ``"win"``/1, ``"loss"``/0, ``"tie"``/0.5 (from the candidate's side);
        ``None``, ``"both_bad"`` and ``"skip"`` are not observations and are ignored. Anything
        else raises ValueError."""
        wins = losses = ties = 0
        for outcome in outcomes:
            kind = _classify(outcome)
            wins += kind == "win"
            losses += kind == "loss"
            ties += kind == "tie"
        return cls(wins=wins, losses=losses, ties=ties)


def _classify(outcome: Outcome) -> Literal["win", "loss", "tie"] | None:
    if outcome is None:
        return None
    if isinstance(outcome, str):
        if outcome in ("win", "loss", "tie"):
            return outcome
        if outcome in _NOT_OBSERVED:
            return None
    elif not isinstance(outcome, bool) and isinstance(outcome, int | float):
        if outcome == 1:
            return "win"
        if outcome == 0:
            return "loss"
        if outcome == 0.5:
            return "tie"
    raise ValueError(
        f"unknown A/B outcome {outcome!r}: expected 'win'/1, 'loss'/0, 'tie'/0.5, "
        "or None/'both_bad'/'skip' (not observations)"
    )


# ============================================================================ intervals
def wilson_interval(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion; ``successes`` may be fractional (ties count half).

    ``(0.0, 1.0)`` when ``n == 0``. A fixed-sample interval, for display: it is not the
    decision rule and is not valid under optional stopping (the decision is).
    """
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes!r}, n={n!r}")
    if not (0.0 < confidence < 1.0):
        raise ValueError(f"confidence must be strictly between 0 and 1, got {confidence!r}")
    if n == 0:
        return (0.0, 1.0)
    z = NormalDist().inv_cdf(0.5 + confidence / 2.0)
    p = successes / n
    z2n = z * z / n
    center = (p + z2n / 2.0) / (1.0 + z2n)
    half = z / (1.0 + z2n) * math.sqrt(p * (1.0 - p) / n + z * z / (4.0 * n * n))
    return (max(0.0, center - half), min(1.0, center + half))


# ============================================================================ promotion gate
@dataclass(frozen=True)
class ABDecision:
    """Where the candidate-vs-parent test stands after the votes in ``tally``.

    Attributes:
        state: ``open`` (keep voting), ``promote``, ``reject`` or ``inconclusive`` (the budget
            ran out). Any state but ``open`` is final: the caller records the first one reached.
        votes: observations so far (ties included; ``both_bad``/skips excluded).
        votes_left: ``max(0, budget - votes)``; 0 once the state is not ``open``.
        win_rate: the candidate's observed win rate, ties counting half; None before any vote.
        interval: a 95% Wilson score interval for the win rate (ties count half); for display,
            not anytime-valid.
        log_lr: the SPRT statistic, ``log LR`` of win rate ``1/2 + δ`` against ``1/2``.
        log_upper: the promotion boundary, ``log(1 / alpha)``.
        log_lower: the rejection boundary, ``log(1 - power)``.
        reason: one human-readable sentence.
        tally: the votes the decision was made on.
    """

    state: ABState
    votes: int
    votes_left: int
    win_rate: float | None
    interval: tuple[float, float]
    log_lr: float
    log_upper: float
    log_lower: float
    reason: str
    tally: ABTally


def sprt_log_lr(tally: ABTally, settings: ABSettings = DEFAULT_SETTINGS) -> float:
    """``log LR`` of the tally: ``(wins + ties/2) log(1 + 2δ) + (losses + ties/2) log(1 - 2δ)``."""
    s = tally.wins + 0.5 * tally.ties
    f = tally.losses + 0.5 * tally.ties
    return s * settings.log_win + f * settings.log_loss


def decide(tally: ABTally, settings: ABSettings = DEFAULT_SETTINGS) -> ABDecision:
    """The state of the promotion test after ``tally``. Pure, deterministic, O(1).

    The boundaries are checked before the budget, so a tally that reaches a boundary on its
    last budgeted vote (or, with votes that arrived concurrently, past the budget) is decided.
    """
    n = tally.votes
    llr = sprt_log_lr(tally, settings)
    upper, lower = settings.log_upper, settings.log_lower
    win_rate = tally.win_rate
    interval = wilson_interval(tally.score, n)
    rate_txt = (
        "no votes yet"
        if win_rate is None
        else f"win rate {win_rate:.3f} over {n} votes (95% CI {interval[0]:.3f}-{interval[1]:.3f})"
    )
    target = 0.5 + settings.min_effect
    state: ABState
    if llr >= upper - _BOUNDARY_TOL:
        state = "promote"
        reason = (
            f"promote: the candidate beats its parent ({rate_txt}); log LR {llr:.3f} reached "
            f"log(1/alpha) = {upper:.3f}, false-promotion rate <= {settings.alpha:g}"
        )
    elif llr <= lower + _BOUNDARY_TOL:
        state = "reject"
        verdict = (
            "the candidate loses to its parent"
            if win_rate is not None and win_rate < 0.5
            else f"the candidate is unlikely to reach a win rate of {target:g}"
        )
        reason = (
            f"reject: {verdict} ({rate_txt}); log LR {llr:.3f} reached log(1 - power) = {lower:.3f}"
        )
    elif n >= settings.budget:
        state = "inconclusive"
        reason = (
            f"inconclusive: the budget of {settings.budget} votes ran out ({rate_txt}); "
            f"log LR {llr:.3f} is between {lower:.3f} and {upper:.3f}"
        )
    else:
        state = "open"
        reason = (
            f"open: {rate_txt}; log LR {llr:.3f}, promote at {upper:.3f}, reject at "
            f"{lower:.3f}, {settings.budget - n} votes left"
        )
    return ABDecision(
        state=state,
        votes=n,
        votes_left=max(0, settings.budget - n) if state == "open" else 0,
        win_rate=win_rate,
        interval=interval,
        log_lr=llr,
        log_upper=upper,
        log_lower=lower,
        reason=reason,
        tally=tally,
    )


# ============================================================================ live monitor
def live_grid(settings: ABSettings = DEFAULT_SETTINGS) -> tuple[float, ...]:
    """The live monitor's alternative win rates: the midpoints of ``LIVE_GRID_POINTS`` equal
    cells of ``[max(0, 1/2 - 2δ), 1/2)``."""
    lo = max(0.0, 0.5 - 2.0 * settings.min_effect)
    width = (0.5 - lo) / LIVE_GRID_POINTS
    return tuple(lo + width * (k + 0.5) for k in range(LIVE_GRID_POINTS))


@lru_cache(maxsize=32)
def _live_log_factors(settings: ABSettings) -> tuple[tuple[float, float], ...]:
    return tuple((math.log(2.0 * q), math.log(2.0 * (1.0 - q))) for q in live_grid(settings))


def live_log_evalue(tally: ABTally, settings: ABSettings = DEFAULT_SETTINGS) -> float:
    """Log of the live monitor's e-value that the candidate is worse than its parent:

        log( (1/K) sum_k (2 q_k)^s (2 (1 - q_k))^f ),  s = wins + ties/2, f = losses + ties/2,

    over the grid ``q_k`` of :func:`live_grid`. 0.0 before any vote.
    """
    s = tally.wins + 0.5 * tally.ties
    f = tally.losses + 0.5 * tally.ties
    terms = [s * lw + f * ll for lw, ll in _live_log_factors(settings)]
    top = max(terms)
    return top + math.log(sum(math.exp(t - top) for t in terms)) - math.log(len(terms))


def live_check(tally: ABTally, settings: ABSettings = DEFAULT_SETTINGS) -> bool:
    """True when the published version is significantly worse than its parent on the live
    votes in ``tally`` (one-sided, anytime-valid at ``settings.alpha``): roll it back.

    No budget: the monitor may run indefinitely and be checked after every vote.
    """
    return live_log_evalue(tally, settings) >= settings.log_upper - _BOUNDARY_TOL
