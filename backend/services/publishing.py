"""The publish policy: what happens to a new candidate, to an A/B decision, and to the
admin's publish / reject / rollback (``docs/publishing.md``).

``PREFLOOP_PUBLISH_POLICY`` (:attr:`Settings.effective_publish_policy`):

- ``human`` (default): the candidate faces its parent in blind A/B pairs; the gate's
  ``promote`` publishes it, ``reject`` retires it, ``inconclusive`` leaves it a candidate for an
  admin to decide.
- ``metric``: the round's automatic metric decides at once: publish when the lower end of the
  95% interval of its difference (candidate - parent) is above ``PREFLOOP_METRIC_MARGIN``,
  retire otherwise; never on a bare positive mean. The metric is the judge's score (built-in
  model), else PickScore, else CLIP score (real models with ``PREFLOOP_PICKSCORE_MODEL_PATH`` /
  ``PREFLOOP_CLIP_MODEL_PATH``, :mod:`worker.auto_metrics`). A model without any of them
  falls back to ``manual``.
- ``manual``: the gate runs and its decision is recorded and shown; an admin acts on it.

Whatever the policy, an admin can publish, reject or roll back by hand at any time; doing so
while a gate is open closes it as ``overridden``. After a version is published (by anyone), a
live A/B test against its parent runs on a smaller share of pairs; a significant loss publishes
the parent again (``rollback``), except under ``manual``, where it is recorded for an admin.

Every function here works inside the caller's transaction (flush, never commit), so a
decision and its action commit together.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from backend.ab_test import ABTally, wilson_interval
from backend.models import ABPhase, ABState, ABTest, ModelVersion, VersionStatus
from backend.services import ab_tests
from backend.services import versions as version_service
from backend.services.errors import Conflict
from backend.settings import Settings

log = logging.getLogger(__name__)

POLICIES = ("human", "metric", "manual")
#: z of the two-sided 95% normal interval of the metric policy.
METRIC_Z = 1.959964


# ---------------------------------------------------------------------------- metric policy
#: The metrics the policy can decide on, in order of preference: (key prefix, label). The
#: round records ``<prefix>_delta`` and ``<prefix>_delta_sem`` (candidate - parent).
DECISION_METRICS = (
    ("judge", "judge"),  # built-in model: worker.shapes.evaluation
    ("pickscore", "PickScore"),  # real models: worker.auto_metrics (preference)
    ("clip", "CLIP score"),  # real models: worker.auto_metrics (prompt fidelity)
)


@dataclass(frozen=True)
class MetricVerdict:
    """The metric policy's view of a candidate: None ``passes`` when there is no metric."""

    passes: bool | None
    delta: float | None = None
    sem: float | None = None
    interval: tuple[float, float] | None = None
    margin: float = 0.0
    reason: str = ""
    name: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "delta": self.delta,
            "sem": self.sem,
            "interval": list(self.interval) if self.interval else None,
            "margin": self.margin,
            "passes": self.passes,
            "reason": self.reason,
        }


def _finite(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    return float(x) if math.isfinite(x) else None


def _paired(m: dict[str, Any], prefix: str) -> tuple[float, float] | None:
    delta, sem = _finite(m.get(f"{prefix}_delta")), _finite(m.get(f"{prefix}_delta_sem"))
    if delta is None or sem is None or sem < 0:
        return None
    return delta, sem


def metric_verdict(metrics: dict[str, Any] | None, margin: float) -> MetricVerdict:
    """Publish only if the lower end of the 95% interval ``delta ± 1.96 sem`` of the round's
    automatic metric is above ``margin``. The metric is the first of :data:`DECISION_METRICS`
    the round recorded (``<prefix>_delta`` and ``<prefix>_delta_sem``): the judge's score,
    else PickScore, else CLIP score. When PickScore decides, the CLIP score's change is quoted
    in the reason (prompt fidelity), not used."""
    m = metrics or {}
    chosen = next(
        ((p, label, f) for p, label in DECISION_METRICS if (f := _paired(m, p)) is not None),
        None,
    )
    if chosen is None:
        return MetricVerdict(
            None,
            margin=margin,
            reason="no automatic metric for this model (judge_delta, pickscore_delta or "
            "clip_delta, each with its _sem)",
        )
    prefix, label, found = chosen
    delta, sem = found
    lo, hi = delta - METRIC_Z * sem, delta + METRIC_Z * sem
    passes = lo > margin
    text = (
        f"{label} delta {delta:+.4f}, 95% CI [{lo:+.4f}, {hi:+.4f}] "
        + ("above" if passes else "not above")
        + f" the margin {margin:+.4f}"
    )
    clip = _paired(m, "clip") if prefix == "pickscore" else None
    if clip is not None:
        text += f" (CLIP score delta {clip[0]:+.4f} ± {clip[1]:.4f} sem, for fidelity)"
    return MetricVerdict(passes, delta, sem, (lo, hi), margin, text, f"{prefix}_delta")


# ---------------------------------------------------------------------------- admin actions
@dataclass
class ActionResult:
    """A publish / reject / rollback: the version, and what happened, in words."""

    version: ModelVersion
    message: str
    notes: list[str] = field(default_factory=list)


def _tally_text(t: ABTally) -> str:
    if not t.votes:
        return "no A/B votes yet"
    return f"{t.wins} wins, {t.losses} losses, {t.ties} ties"


def _override_gate(session: Session, version: ModelVersion, by: str, what: str) -> str | None:
    """Close ``version``'s open gate as ``overridden``; the note, or None when none was open."""
    gate = ab_tests.get_test(session, version.id, ABPhase.gate)
    if gate is None or ABState(gate.state) != ABState.open:
        return None
    ev = ab_tests.evaluate(session, gate)
    reason = (
        f"overridden: {what} by {by} before the A/B decision "
        f"({_tally_text(ev.tally)}; the test was {ev.reason})"
    )
    ab_tests.record_decision(
        session, gate, ABState.overridden, tally=ev.tally, reason=reason, action=what
    )
    return (
        f"the A/B gate of version {version.id} was still open ({_tally_text(ev.tally)}): it is "
        f"closed as 'overridden' and its pairs are no longer served"
    )


def _close_live(session: Session, version_id: int, reason: str, action: str) -> bool:
    live = ab_tests.get_test(session, version_id, ABPhase.live)
    if live is None or ABState(live.state) != ABState.open:
        return False
    tally = ab_tests.current_tally(session, live)
    return ab_tests.record_decision(
        session, live, ABState.closed, tally=tally, reason=reason, action=action
    )


def publish_version(
    session: Session, version_id: int, settings: Settings, *, by: str = "an admin"
) -> ActionResult:
    """Make ``version_id`` the serving version (idempotent), keeping the A/B tests right: its
    open gate is closed as ``overridden``, the previous version's live test is closed, and a
    live test of the new version against its parent is opened."""
    version = version_service.get_version(session, version_id, for_update=True)
    if VersionStatus(version.status) == VersionStatus.published:
        return ActionResult(version, f"version {version_id} is already the serving version")
    notes = []
    note = _override_gate(session, version, by, "published")
    if note:
        notes.append(note)
    previous = version_service.serving_version(session)
    if previous is not None and previous.id != version.id:
        _close_live(
            session,
            previous.id,
            f"closed: version {version.id} was published by {by}",
            "none",
        )
    version_service.publish(session, version.id)
    live = ab_tests.open_test(
        session,
        version=version,
        phase=ABPhase.live,
        policy=settings.effective_publish_policy,
        ab=settings.ab_settings,
    )
    if live is not None and ABState(live.state) == ABState.open:
        notes.append(
            f"a live A/B test against its parent (version {version.parent_id}) runs on "
            f"{settings.ab_live_share:.0%} of served pairs"
        )
    message = f"version {version_id} is now the serving version" + (
        f" (replacing version {previous.id})" if previous is not None else ""
    )
    log.info("%s, by %s", message, by)
    return ActionResult(version, message, notes)


def reject_version(
    session: Session, version_id: int, *, by: str = "an admin", reason: str | None = None
) -> ActionResult:
    """Retire a candidate (409 for the serving version), closing its open gate."""
    version = version_service.get_version(session, version_id, for_update=True)
    if VersionStatus(version.status) == VersionStatus.published:
        raise Conflict(
            f"version {version_id} is the serving version; roll it back "
            f"(POST /api/v1/versions/{version_id}/rollback) or publish another version first"
        )
    notes = []
    note = _override_gate(session, version, by, "retired")
    if note:
        notes.append(note)
    version_service.retire(session, version_id)
    if reason:
        version.metrics = {**(version.metrics or {}), "rejected_reason": reason[:2000]}
        session.flush()
    return ActionResult(version, f"version {version_id} is retired", notes)


def rollback_version(
    session: Session,
    version_id: int,
    settings: Settings,
    *,
    by: str = "an admin",
    reason: str | None = None,
) -> ActionResult:
    """Publish the parent of the serving version ``version_id`` again. 409 when it is not the
    serving version or has no parent."""
    version = version_service.get_version(session, version_id, for_update=True)
    if VersionStatus(version.status) != VersionStatus.published:
        raise Conflict(
            f"version {version_id} is not the serving version (it is "
            f"{VersionStatus(version.status).value}); only the serving version can be rolled "
            "back: publish the version you want to serve instead"
        )
    if version.parent_id is None:
        raise Conflict(f"version {version_id} has no parent to roll back to")
    why = f"rolled back by {by}" + (f": {reason}" if reason else "")
    _close_live(session, version.id, f"closed: {why}", "rolled_back")
    version.metrics = {**(version.metrics or {}), "rolled_back": why[:2000]}
    result = publish_version(session, version.parent_id, settings, by=by)
    return ActionResult(
        version,
        f"version {version_id} was rolled back: its parent, version {version.parent_id}, "
        "serves again",
        result.notes,
    )


# ---------------------------------------------------------------------------- new candidates
@dataclass(frozen=True)
class CandidateOutcome:
    """What the policy did with a new candidate."""

    policy: str
    published: bool
    action: str  # published | retired | ab_gate | none
    reason: str
    metric: MetricVerdict | None = None


def on_candidate(
    session: Session, version: ModelVersion, settings: Settings, *, auto_publish: bool = False
) -> CandidateOutcome:
    """Apply the publish policy to a candidate just inserted (flushed) by a round, in the
    round's transaction. ``auto_publish`` (the worker's legacy switch) forces ``metric``."""
    policy = "metric" if auto_publish else settings.effective_publish_policy
    verdict = None
    gate_policy = policy
    if policy == "metric":
        verdict = metric_verdict(version.metrics, settings.metric_margin)
        if verdict.passes:
            publish_version(session, version.id, settings, by="the metric policy")
            return CandidateOutcome(
                policy, True, "published", f"published: {verdict.reason}", verdict
            )
        if verdict.passes is False:
            reason = f"rejected by the metric policy: {verdict.reason}"
            reject_version(session, version.id, by="the metric policy", reason=reason)
            return CandidateOutcome(policy, False, "retired", reason, verdict)
        gate_policy = "manual"  # no metric: the A/B gate informs, an admin decides
    gate = ab_tests.open_test(
        session, version=version, phase=ABPhase.gate, policy=gate_policy, ab=settings.ab_settings
    )
    if gate is None:
        return CandidateOutcome(
            policy, False, "none", "the version has no parent to compare with", verdict
        )
    what = {
        "human": "publishes on promote, retires on reject",
        "manual": "is recorded; an admin publishes or rejects",
    }[gate_policy]
    reason = (
        f"A/B gate opened against version {version.parent_id} "
        f"({settings.ab_share:.0%} of served pairs); its decision {what}"
    )
    if verdict is not None:
        reason = f"{verdict.reason}; {reason}"
    return CandidateOutcome(policy, False, "ab_gate", reason, verdict)


# ---------------------------------------------------------------------------- decisions
@dataclass(frozen=True)
class CheckResult:
    test_id: int
    version_id: int
    phase: str
    state: str
    action: str | None
    reason: str


def _result(test: ABTest) -> CheckResult:
    return CheckResult(
        test.id,
        test.version_id,
        ABPhase(test.phase).value,
        ABState(test.state).value,
        test.action,
        test.reason or "",
    )


def _act_on_gate(session: Session, test: ABTest, version: ModelVersion, settings: Settings) -> None:
    state = ABState(test.state)
    by = "the A/B gate"
    if test.policy != "human":
        ab_tests.set_action(
            session, test, "none", f"{test.reason}. Policy {test.policy}: an admin decides."
        )
        return
    if state == ABState.promote:
        serving = version_service.serving_version(session)
        if serving is not None and serving.id != test.parent_id:
            ab_tests.set_action(
                session,
                test,
                "none",
                f"{test.reason}. Not published: its parent (version {test.parent_id}) no "
                f"longer serves (version {serving.id} does); an admin decides.",
            )
            return
        publish_version(session, version.id, settings, by=by)
        ab_tests.set_action(session, test, "published")
    elif state == ABState.reject:
        reject_version(session, version.id, by=by, reason=test.reason)
        ab_tests.set_action(session, test, "retired")
    else:  # inconclusive
        ab_tests.set_action(
            session, test, "none", f"{test.reason}. It stays a candidate: an admin decides."
        )


def _act_on_live(session: Session, test: ABTest, version: ModelVersion, settings: Settings) -> None:
    if test.policy == "manual":
        ab_tests.set_action(
            session, test, "none", f"{test.reason}. Policy manual: an admin decides."
        )
        return
    version.metrics = {**(version.metrics or {}), "rolled_back": test.reason}
    publish_version(session, test.parent_id, settings, by="the live A/B monitor")
    ab_tests.set_action(session, test, "rolled_back")


def check_test(session: Session, test_id: int, settings: Settings) -> CheckResult | None:
    """Look at an open test's votes; on its first decision record it and act on it (in the
    caller's transaction). None when the test is unknown or already decided (nothing to do:
    a second check, or a late vote, changes nothing)."""
    test = ab_tests.get_test_by_id(session, test_id)
    if test is None or ABState(test.state) != ABState.open:
        return None
    # Lock order: the version, then the test (as publish / reject do), so a check racing an
    # admin's action waits instead of deadlocking.
    version = version_service.get_version(session, test.version_id, for_update=True)
    session.refresh(test, with_for_update=True)
    if ABState(test.state) != ABState.open:
        return None
    status = VersionStatus(version.status)
    phase = ABPhase(test.phase)
    if phase == ABPhase.gate and status != VersionStatus.candidate:
        ev = ab_tests.evaluate(session, test)
        ab_tests.record_decision(
            session,
            test,
            ABState.overridden,
            tally=ev.tally,
            reason=f"overridden: the version is {status.value}, no longer a candidate",
            action="none",
        )
        return _result(test)
    if phase == ABPhase.live and status != VersionStatus.published:
        ab_tests.record_decision(
            session,
            test,
            ABState.closed,
            tally=ab_tests.current_tally(session, test),
            reason=f"closed: the version is {status.value}, no longer serving",
            action="none",
        )
        return _result(test)
    ev = ab_tests.evaluate(session, test)
    if ev.state == ABState.open:
        return None
    if not ab_tests.record_decision(
        session, test, ev.state, tally=ev.tally, reason=ev.reason, action=None
    ):
        return None
    if phase == ABPhase.gate:
        _act_on_gate(session, test, version, settings)
    else:
        _act_on_live(session, test, version, settings)
    log.info("A/B %s of version %s: %s (%s)", phase.value, version.id, test.state, test.action)
    return _result(test)


def check_open_tests(
    session_factory: Callable[[], Session], settings: Settings
) -> list[CheckResult]:
    """Check every open test, each in its own transaction (the ``ab.check`` task)."""
    with session_factory() as session:
        ids = [t.id for t in ab_tests.open_tests(session)]
        session.rollback()
    done = []
    for test_id in ids:
        with session_factory() as session:
            try:
                result = check_test(session, test_id, settings)
                session.commit()
            except BaseException:
                session.rollback()
                raise
        if result is not None:
            done.append(result)
    return done


# ---------------------------------------------------------------------------- the report
def _test_view(session: Session, test: ABTest) -> dict[str, Any]:
    """One test as ``GET /versions/{id}/ab`` shows it."""
    from backend.ab_test import decide, live_log_evalue

    ab = ab_tests.settings_of(test)
    phase = ABPhase(test.phase)
    state = ABState(test.state)
    if phase == ABPhase.gate:
        observations = ab_tests.outcomes(session, test)
        if state == ABState.open:
            ev = ab_tests.first_decision(observations, ab)
            tally, reason = ev.tally, ev.reason
        else:
            tally, reason = ABTally(test.wins, test.losses, test.ties), test.reason or ""
        later = max(0, len(observations) - tally.votes)
    else:
        now = ab_tests.current_tally(session, test)
        if state == ABState.open:
            tally = now
            reason = ab_tests.live_evaluation(tally, ab).reason
        else:
            tally, reason = ABTally(test.wins, test.losses, test.ties), test.reason or ""
        later = max(0, now.votes - tally.votes)
    d = decide(tally, ab)
    lo, hi = wilson_interval(tally.score, tally.votes)
    view: dict[str, Any] = {
        "test_id": test.id,
        "phase": phase.value,
        "state": state.value,
        "parent_id": test.parent_id,
        "policy": test.policy,
        "battles": tally.votes,
        "wins": tally.wins,
        "losses": tally.losses,
        "ties": tally.ties,
        "win_rate": tally.win_rate,
        "interval": [lo, hi],
        "reason": reason,
        "action": test.action,
        "settings": ab_tests.settings_snapshot(ab),
        "opened_at": test.created_at,
        "decided_at": test.decided_at,
        "votes_after_decision": later,
    }
    if phase == ABPhase.gate:
        view.update(
            budget=ab.budget,
            votes_left=d.votes_left if state == ABState.open else 0,
            log_lr=d.log_lr,
            promote_at=d.log_upper,
            reject_at=d.log_lower,
        )
    else:
        view.update(
            budget=None,
            votes_left=None,
            log_evalue=live_log_evalue(tally, ab),
            rollback_at=ab.log_upper,
        )
    return view


def ab_report(session: Session, version_id: int, settings: Settings) -> dict[str, Any]:
    """Everything about a version's A/B tests (404 for an unknown version): the gate (before
    serving) and the live monitor (while serving), each with battles, wins, losses, ties, the
    win rate with its 95% Wilson interval, the state, the votes left in the budget, and what
    was done; plus the metric policy's verdict when the version has the metric."""
    version = version_service.get_version(session, version_id)
    gate = ab_tests.get_test(session, version.id, ABPhase.gate)
    live = ab_tests.get_test(session, version.id, ABPhase.live)
    verdict = metric_verdict(version.metrics, settings.metric_margin)
    return {
        "version_id": version.id,
        "name": version.name,
        "parent_id": version.parent_id,
        "status": VersionStatus(version.status).value,
        "candidate": VersionStatus(version.status) == VersionStatus.candidate,
        "policy": settings.effective_publish_policy,
        "state": ABState(gate.state).value if gate is not None else "none",
        "gate": _test_view(session, gate) if gate is not None else None,
        "live": _test_view(session, live) if live is not None else None,
        "metric": verdict.as_dict() if verdict.passes is not None else None,
    }
