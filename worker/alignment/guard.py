"""The guards of a training run: pure bookkeeping on the numbers a run reports.

- :class:`LossSpikeGuard` (per step): a sustained loss spike, a run bad from the start (running
  median above a ceiling, or running mean above ln 2 for too long).
- :class:`EvalTracker` (per held-out evaluation): keeps the best evaluation within the drift
  and fidelity budgets, and says when to stop: the held-out loss stopped improving (early
  stopping), the policy drifted past its budget, or the fidelity probe fell by more than its
  budget.

No torch: every rule here is tested by hand on lists of numbers (tests/alignment/test_guard.py).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from worker.alignment.metrics import EvalMetrics

if TYPE_CHECKING:
    from worker.alignment.config import TrainConfig

__all__ = ["LN2", "EvalTracker", "LossSpikeGuard"]

#: Every DPO-family loss at the reference (the policy equals its reference): -log σ(0).
LN2 = math.log(2.0)


@dataclass
class LossSpikeGuard:
    """Flags a run whose loss stays far above its recent typical value.

    A loss above ``factor`` x the median of the last ``window`` accepted losses is a spike
    (checked once ``min_history`` losses are known; spikes do not enter the history). After
    ``max_consecutive`` spikes in a row, :meth:`observe` returns the reason to stop.
    ``factor=None`` disables the check. Non-finite losses are the trainer's business: they stop a
    run at once.

    A run that is bad *from the start* has no good history to spike against, so there is also a
    ceiling: every DPO-family loss starts at ``ln 2 ≈ 0.693`` (the model equals its reference),
    and a run that learns the preferences brings it down. Once ``min_history`` losses are known,
    a running median above ``ceiling`` means the model is moving *against* the preferences
    (typically a learning rate or β far too large), and :meth:`observe` returns the reason to
    stop. ``ceiling=None`` disables it.

    A gentler form of the same failure: the running *mean* of the window stays above ln 2 for
    ``above_chance_limit`` consecutive steps. A run that learns anything brings its mean training
    loss below ln 2 within a few dozen steps (it at least fits its own pairs); one that does not
    is moving away from its preferences or learning nothing. ``None`` disables it.
    """

    factor: float | None
    window: int
    min_history: int
    max_consecutive: int
    ceiling: float | None = None
    above_chance_limit: int | None = None
    recent: list[float] = field(default_factory=list)
    consecutive: int = 0
    above_chance: int = 0

    @classmethod
    def from_config(cls, config: TrainConfig) -> LossSpikeGuard:
        return cls(
            config.loss_spike_factor,
            config.spike_window,
            config.spike_min_history,
            config.max_consecutive_spikes,
            config.max_median_loss,
            config.max_steps_above_chance,
        )

    def observe(self, loss: float) -> str | None:
        """Records one step's loss; returns why the run must stop, or None."""
        reason = self._observe_spike(loss)
        if reason is None and self.ceiling is not None and len(self.recent) >= self.min_history:
            median = statistics.median(self.recent)
            if median > self.ceiling:
                return (
                    f"the running median loss {median:.4g} is above {self.ceiling:g} (it starts "
                    f"at ln 2 = 0.693 and should fall): the model is moving against the "
                    f"preferences; lower the learning rate or beta"
                )
        if reason is None and self.above_chance_limit is not None:
            if len(self.recent) >= self.min_history and statistics.fmean(self.recent) > LN2:
                self.above_chance += 1
                if self.above_chance >= self.above_chance_limit:
                    return (
                        f"the running mean loss {statistics.fmean(self.recent):.4g} has stayed "
                        f"above ln 2 = 0.693 for {self.above_chance} steps: the model is not "
                        "learning these preferences; lower the learning rate or beta, or check "
                        "the labels"
                    )
            else:
                self.above_chance = 0
        return reason

    def _observe_spike(self, loss: float) -> str | None:
        if self.factor is not None and len(self.recent) >= self.min_history:
            median = statistics.median(self.recent)
            if median > 0 and loss > self.factor * median:
                self.consecutive += 1
                if self.consecutive >= self.max_consecutive:
                    return (
                        f"loss {loss:.4g} above {self.factor:g} x the running median "
                        f"{median:.4g} for {self.consecutive} consecutive steps"
                    )
                return None
        self.consecutive = 0
        self.recent = (self.recent + [float(loss)])[-self.window :]
        return None

    def state_dict(self) -> dict[str, Any]:
        return {
            "recent": list(self.recent),
            "consecutive": self.consecutive,
            "above_chance": self.above_chance,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.recent = [float(x) for x in state["recent"]][-self.window :]
        self.consecutive = int(state["consecutive"])
        self.above_chance = int(state.get("above_chance", 0))


@dataclass
class EvalTracker:
    """Best-checkpoint selection, early stopping and the drift budget, on held-out evaluations.

    :meth:`observe` takes each :class:`EvalMetrics` in step order (the first is usually step 0,
    the reference itself: accuracy 0.5, loss ln 2, drift 0) and returns ``(is_best, stop)``:

    - an evaluation whose ``drift`` exceeds ``drift_budget``, or whose ``fidelity`` change is
      below ``-fidelity_budget`` (the probe's paired change against the reference,
      :mod:`worker.alignment.fidelity`), is never the best; a drift past budget stops the run
      at once, a fidelity reading past budget after ``fidelity_patience`` such readings in a
      row (``stop`` says why); the best evaluation so far, within budget, is what the run
      keeps;
    - otherwise it is the new best when its held-out loss is below the best's by more than
      ``min_delta`` (the first evaluation is always the best so far);
    - after ``patience`` evaluations in a row that are not the best, ``stop`` says the curve
      stopped improving (``patience=0``: never).

    The held-out *loss* decides, not the accuracy: it uses every pair's margin, so it is smoother
    on a few dozen pairs, and it rises as soon as the policy overshoots.
    """

    patience: int = 0
    min_delta: float = 0.0
    drift_budget: float | None = None
    fidelity_budget: float | None = None
    fidelity_patience: int = 1
    evals: list[EvalMetrics] = field(default_factory=list)
    best_index: int | None = None
    since_best: int = 0
    over_fidelity: int = 0

    @classmethod
    def from_config(cls, config: TrainConfig) -> EvalTracker:
        return cls(
            patience=config.early_stopping_patience,
            min_delta=config.early_stopping_min_delta,
            drift_budget=config.drift_budget,
            fidelity_budget=config.fidelity_budget,
            fidelity_patience=config.fidelity_patience,
        )

    @property
    def best(self) -> EvalMetrics | None:
        return None if self.best_index is None else self.evals[self.best_index]

    def observe(self, m: EvalMetrics) -> tuple[bool, str | None]:
        """Records one evaluation; returns (whether it is the new best, why to stop or None)."""
        self.evals.append(m)
        best = self.best
        if self.drift_budget is not None and m.drift > self.drift_budget:
            kept = f"step {best.step}" if best is not None else "nothing"
            return False, (
                f"drift {m.drift:.4g} at step {m.step} is above the budget "
                f"{self.drift_budget:g}: stopped, keeping {kept}"
            )
        if (
            self.fidelity_budget is not None
            and m.fidelity is not None
            and m.fidelity < -self.fidelity_budget
        ):
            self.over_fidelity += 1
            self.since_best += 1
            if self.over_fidelity < self.fidelity_patience:
                return False, None
            kept = f"step {best.step}" if best is not None else "nothing"
            in_a_row = (
                f" ({self.over_fidelity} readings in a row)" if self.over_fidelity > 1 else ""
            )
            return False, (
                f"fidelity fell by {-m.fidelity:.4g} at step {m.step}, more than the budget "
                f"{self.fidelity_budget:g}{in_a_row}: stopped, keeping {kept}"
            )
        self.over_fidelity = 0
        if best is None or m.loss < best.loss - self.min_delta:
            self.best_index = len(self.evals) - 1
            self.since_best = 0
            return True, None
        self.since_best += 1
        if self.patience and self.since_best >= self.patience:
            return False, (
                f"held-out loss has not improved for {self.since_best} evaluations (best "
                f"{best.loss:.4f} at step {best.step}): stopped early"
            )
        return False, None

    def state_dict(self) -> dict[str, Any]:
        return {
            "evals": [e.as_dict() for e in self.evals],
            "best_index": self.best_index,
            "since_best": self.since_best,
            "over_fidelity": self.over_fidelity,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.evals = [EvalMetrics(**e) for e in state["evals"]]
        self.best_index = state["best_index"]
        self.since_best = int(state["since_best"])
        self.over_fidelity = int(state.get("over_fidelity", 0))
