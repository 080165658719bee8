"""Training rounds on the GPU worker: :func:`run_round` (the ``train.round`` task).

The round's code, by job:

- :mod:`worker.rounds` (this module): :func:`run_round` and its steps (the dataset snapshot,
  training with progress, the candidate rule, validation samples, publishing the candidate),
  and the paths of a round's files.
- :mod:`worker.round_state`: the round's state machine on the database (the claim, guarded
  updates, the heartbeat, the stop check).
- :mod:`worker.round_schedule`: the sweeper and the scheduler (the ``rounds.sweep`` task).
- :mod:`worker.shapes.evaluation`: the built-in judge's evaluation against the parent.

:func:`run_round` takes a committed round from ``queued`` to a finished state::

    queued -> running -> evaluating -> succeeded
                 |            |
                 +------------+--> failed | cancelled

1. **Claim** (:mod:`worker.round_state`). The round becomes ``running`` under this task's id,
   unless it is finished, owned by another live worker, or out of attempts.
2. **Dataset snapshot.** Within-version votes, and votes on imported cross-model pairs, of
   ``config.data_source``, with ``id <= snapshot_max_vote_id`` (so a retry sees the same
   data), by active annotators (flagged ones left out with
   ``config.exclude_flagged``): left/right as (winner, loser), ties only when
   ``config.include_ties``, both-bad and skip never, made into labels by
   ``config.label_rule`` (``metrics["labels"]`` counts what it kept). Images are read from
   the store (:func:`backend.storage.image_store`: local disk or object storage).
3. **Train** from the parent version (its lineage fused, :mod:`worker.model_registry`) with
   :func:`worker.alignment.trainer.train`, in ``<models_dir>/rounds/round-<id>`` where the
   trainer keeps resumable checkpoints: a round taken over from a dead worker resumes there.
   Every step's metrics become :class:`RoundMetric` rows and the round's ``progress`` /
   ``step`` / ``metrics``, written at most once per :data:`PROGRESS_EVERY_S`. Before every
   step the round's status is read (at most once per second): ``cancelled`` in the database,
   or another owner, stops the run. A heartbeat thread touches ``updated_at`` meanwhile.
4. **Evaluate** (``evaluating``). Built-in model: the judge scores the parent and the new
   model on held-out prompts with fixed seeds; the metrics record both means, their
   difference and its standard error, and whether the new model improved.
5. **Publish a candidate.** The adapter is uploaded to the artifact store
   (:func:`backend.storage.artifact_store`: ``<data_dir>/models`` or object storage) under a
   prefix unique to this attempt, ``versions/round-<id>/a<attempt>-<random>/adapter.safetensors``
   (the validation grid beside it, its manifest last), and its SHA-256 read back and checked;
   then one transaction (guarded on the round still being ours and ``evaluating``) inserts the
   :class:`ModelVersion` (``candidate``, ``parent_id``, metrics) and marks the round
   ``succeeded``. In the same transaction the publish policy acts on it
   (``backend.services.publishing.on_candidate``, docs/publishing.md): it opens the blind A/B
   gate against the parent (``human`` / ``manual``), or publishes or retires it on the judge's
   interval (``metric``). A version row exists only with its complete adapter file behind it:
   the row is the commit point, and readers reach adapters only through rows. An attempt that
   dies before the commit leaves an unreferenced prefix, which the round's next attempt (on
   success) or its failure removes; a worker that lost the round removes only its own.
   A round whose held-out evaluation never beat its parent makes no version at all
   (:func:`candidate_verdict`, docs/rounds.md).

Failures: a diverged run (non-finite loss, loss-spike guard) fails the round with the
trainer's reason and writes no version and no adapter at the final path; any other error
fails it with the error's text. An error that prevents writing the failure (the database is
down) leaves the round ``running``; its heartbeat stops and
:func:`worker.round_schedule.sweep` re-queues it.
"""

from __future__ import annotations

import io
import logging
import math
import shutil
import tempfile
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, aliased

from backend.models import (
    Choice,
    Image,
    ModelVersion,
    Pair,
    Prompt,
    RoundMetric,
    RoundStatus,
    TrainingRound,
    VersionStatus,
    Vote,
)
from backend.round_config import RoundConfig, epoch_capped_steps
from backend.services import rounds as round_service
from backend.services import versions as version_service
from backend.services.common import dialect_insert
from backend.services.quality import quality_report
from backend.settings import Settings
from backend.storage import ImageStore, ObjectStore, artifact_store, image_store
from worker import auto_metrics, model_registry
from worker.alignment.data import split_by_prompt
from worker.round_state import (
    ACTIVE,
    RoundFailed,
    SessionFactory,
    _Claim,
    _claim,
    _current_status,
    _guarded_update,
    _Heartbeat,
    _NotOwner,
    _now,
    _set,
    _StopCheck,
    work_dir,
)
from worker.shapes.evaluation import evaluate_against_parent

log = logging.getLogger(__name__)

#: Progress and metric rows are written at most this often (and at the last step).
PROGRESS_EVERY_S = 1.0
#: Metric rows per INSERT (SQLite caps the bound parameters of one statement).
METRIC_ROWS_PER_STATEMENT = 500
ADAPTER_FILENAME = "adapter.safetensors"
FULL_WEIGHTS_FILENAME = "unet.safetensors"


def version_name(round_id: int) -> str:
    return f"round-{round_id}"


def version_dir_key(round_id: int) -> str:
    """The artifact store's prefix of every publishing attempt of a round."""
    return f"versions/{version_name(round_id)}"


def attempt_prefix(round_id: int, attempt: int) -> str:
    """A prefix for one publishing attempt's files, unique even between two workers that both
    believe they own the round: nothing written under it is ever overwritten."""
    return f"{version_dir_key(round_id)}/a{attempt}-{uuid.uuid4().hex[:12]}"


def remove_unpublished(artifacts: ObjectStore, round_id: int, keep: str | None = None) -> None:
    """Remove the attempt prefixes of ``round_id`` other than ``keep`` (best effort): files
    that no version row refers to (a dead attempt's, or a failed round's)."""
    base = version_dir_key(round_id)
    try:
        if keep is None:
            artifacts.delete_tree(base)
            return
        for name in artifacts.listdir(base):
            if f"{base}/{name}" != keep:
                artifacts.delete_tree(f"{base}/{name}")
    except Exception:  # noqa: BLE001 - unreferenced files are harmless; the store may be down
        log.warning("round %s: could not remove unpublished files", round_id, exc_info=True)


# ---------------------------------------------------------------------------- config
def train_config(config: dict[str, Any]) -> Any:
    """The stored round config (``backend.round_config``) as the trainer's ``TrainConfig``
    (the one mapping: ``backend.round_config.train_config_kwargs``)."""
    from backend.round_config import train_config_kwargs
    from worker.alignment.config import ConfigError, TrainConfig

    try:
        rc = RoundConfig.model_validate(config)
    except ValueError as exc:
        raise RoundFailed(f"invalid round config: {exc}") from None
    try:
        return TrainConfig(**train_config_kwargs(rc))
    except ConfigError as exc:
        raise RoundFailed(f"invalid training config: {exc}") from None


# ---------------------------------------------------------------------------- dataset
@dataclass
class Snapshot:
    pairs: list[Any]
    votes: int
    ties: int


def _load_image(store: ImageStore, rel: str) -> np.ndarray:
    with PILImage.open(io.BytesIO(store.read(rel))) as im:
        return np.array(im.convert("RGB"))  # a writable copy (the trainer wraps it)


def snapshot_rows(
    session: Session,
    *,
    max_vote_id: int,
    include_ties: bool,
    label_rule: str = "each",
    exclude_users: frozenset[int] = frozenset(),
    data_source: str = "both",
) -> tuple[list[Any], dict[str, Any]]:
    """The round's labels: ``(choice, winner_image_id, prompt, a_id, a_path, b_id, b_path)``,
    and the label counts for its metrics.

    :func:`backend.services.rounds.training_votes` (the one definition of the votes a round
    trains on: within-version pairs and imported cross-model pairs of ``data_source``, active
    annotators, left/right plus ties when ``include_ties``) up to ``max_vote_id``, with each
    pair's prompt and images, made into
    labels by :func:`backend.services.rounds.label_snapshot` (``label_rule``, the votes of
    ``exclude_users`` left out).
    """
    img_a, img_b = aliased(Image), aliased(Image)
    rows = session.execute(
        round_service.training_votes(
            Vote.pair_id,
            Vote.user_id,
            Vote.choice,
            Vote.winner_image_id,
            Prompt.text,
            img_a.id,
            img_a.storage_path,
            img_b.id,
            img_b.storage_path,
            include_ties=include_ties,
            max_vote_id=max_vote_id,
            data_source=data_source,
        )
        .join(Prompt, Prompt.id == Pair.prompt_id)
        .join(img_a, img_a.id == Pair.image_a_id)
        .join(img_b, img_b.id == Pair.image_b_id)
        .order_by(Vote.id)
    ).all()
    return round_service.label_snapshot(rows, label_rule, exclude_users=exclude_users)


def load_snapshot(rows: list[Any], settings: Settings) -> Snapshot:
    """The preference pairs of :func:`snapshot_rows`, images read from storage."""
    from worker.alignment.trainer import PreferencePair

    store = image_store(settings)
    cache: dict[int, np.ndarray] = {}

    def image(image_id: int, rel: str) -> np.ndarray:
        if image_id not in cache:
            cache[image_id] = _load_image(store, rel)
        return cache[image_id]

    pairs = []
    ties = 0
    for choice, winner_id, prompt, a_id, a_path, b_id, b_path in rows:
        if Choice(choice) == Choice.tie:
            ties += 1
            pairs.append(PreferencePair(prompt, image(a_id, a_path), image(b_id, b_path), tie=True))
        elif winner_id == a_id:
            pairs.append(PreferencePair(prompt, image(a_id, a_path), image(b_id, b_path)))
        elif winner_id == b_id:
            pairs.append(PreferencePair(prompt, image(b_id, b_path), image(a_id, a_path)))
        else:
            log.warning(
                "vote with winner %s outside its pair (%s, %s) skipped", winner_id, a_id, b_id
            )
    return Snapshot(pairs=pairs, votes=len(rows), ties=ties)


# ---------------------------------------------------------------------------- progress
@dataclass
class _ProgressWriter:
    """Buffers each step's metrics and writes them (rows + round summary) at most 1/s."""

    session_factory: SessionFactory
    claim: _Claim
    total_steps: int
    base_metrics: dict[str, Any]
    pending: list[Any] = field(default_factory=list)
    last_write: float = 0.0
    last: Any = None
    evals: dict[int, dict[str, Any]] = field(default_factory=dict)

    def __call__(self, m: Any) -> None:
        self.pending.append(m)
        self.last = m
        if m.step >= self.total_steps or time.monotonic() - self.last_write >= PROGRESS_EVERY_S:
            self.flush()

    def on_eval(self, e: Any) -> None:
        """A held-out evaluation (``EvalMetrics``): kept for the round's ``heldout`` curve and
        written with its step's metric row."""
        self.evals[int(e.step)] = heldout_point(e)

    def summary(self) -> dict[str, Any]:
        out = dict(self.base_metrics)
        if self.last is not None:
            out.update(
                loss=_finite(self.last.loss),
                implicit_acc=_finite(self.last.implicit_acc),
                reward_margin=_finite(self.last.reward_margin),
                lr=_finite(self.last.lr),
            )
        if self.evals:
            out["heldout"] = [self.evals[k] for k in sorted(self.evals)]
        return out

    def flush(self) -> None:
        if not self.pending:
            return
        rows = [
            {
                "round_id": self.claim.round_id,
                "step": m.step,
                "loss": _finite(m.loss),
                "implicit_acc": _finite(m.implicit_acc),
                "reward_margin": _finite(m.reward_margin),
                "extra": {
                    "lr": _finite(m.lr),
                    "grad_norm": _finite(m.grad_norm),
                    "model_mse": _finite(m.model_mse),
                    "ref_mse": _finite(m.ref_mse),
                    "timestep_histogram": list(m.timestep_histogram),
                    "seconds": _finite(m.seconds),
                    "heldout": self.evals.get(m.step),
                },
                "created_at": _now(),
            }
            for m in self.pending
        ]
        last = self.pending[-1]
        with self.session_factory() as session:
            # A cancelled round still gets the steps it trained (its loss curve up to there).
            ok = _guarded_update(
                session,
                self.claim,
                (RoundStatus.running, RoundStatus.cancelled),
                step=last.step,
                progress=min(1.0, last.step / max(1, self.total_steps)),
                metrics=self.summary(),
            )
            for start in range(0, len(rows) if ok else 0, METRIC_ROWS_PER_STATEMENT):
                stmt = dialect_insert(session, RoundMetric.__table__).values(
                    rows[start : start + METRIC_ROWS_PER_STATEMENT]
                )
                stmt = stmt.on_conflict_do_update(
                    index_elements=["round_id", "step"],
                    set_={
                        k: stmt.excluded[k]
                        for k in ("loss", "implicit_acc", "reward_margin", "extra", "created_at")
                    },
                )
                session.execute(stmt)
            session.commit()
        self.pending.clear()
        self.last_write = time.monotonic()


def heldout_point(e: Any) -> dict[str, Any]:
    """One held-out evaluation as stored in a round's metrics (JSON-ready)."""
    return {
        "step": int(e.step),
        "accuracy": _finite(e.accuracy),
        "loss": _finite(e.loss),
        "margin": _finite(e.margin),
        "drift": _finite(e.drift),
        "model_mse": _finite(e.model_mse),
        "ref_mse": _finite(e.ref_mse),
        "fidelity": None if e.fidelity is None else _finite(e.fidelity),
        "fidelity_sem": None if e.fidelity_sem is None else _finite(e.fidelity_sem),
    }


def fidelity_probe_for(
    base_model: str, rc: RoundConfig, heldout: list[Any], settings: Any = None
) -> Any:
    """The round's fidelity probe (:mod:`worker.alignment.fidelity`), or None.

    With ``rc.fidelity_budget`` set and held-out pairs to draw prompts from, the probe samples
    ``rc.fidelity_units`` units of the held-out prompts (seeds from the round's seed) and
    scores them with the family's prompt-fidelity metric: the judge on the built-in model,
    CLIP score when ``settings.clip_model_path`` names a local CLIP model. Raises
    :class:`RoundFailed` when a budget is asked for and there is no metric to read it with.
    """
    from worker.alignment.fidelity import FidelityProbe, probe_units

    if rc.fidelity_budget is None or not heldout or rc.eval_every == 0:
        return None
    prompts, seeds = probe_units([p.prompt for p in heldout], rc.fidelity_units, rc.seed)
    if model_registry.is_builtin(base_model):
        from worker.shapes.judge import judge_batch

        name, score = "judge", judge_batch
    elif getattr(settings, "clip_model_path", None):
        name, score = (
            "clip_score",
            auto_metrics.ClipScorer.from_pretrained(settings.clip_model_path).score,
        )
    else:
        raise RoundFailed(
            "fidelity_budget is set, but this model has no fidelity metric to read it with: "
            "set PREFLOOP_CLIP_MODEL_PATH to a local CLIP model, or set fidelity_budget to null"
        )
    return FidelityProbe(
        prompts, seeds, score, name=name, num_inference_steps=rc.fidelity_sampling_steps
    )


def candidate_verdict(result: Any, heldout_pairs: int, min_gain: float) -> str | None:
    """Why a trained round must not produce a candidate, or None when it may.

    A round with held-out pairs produces a candidate only if its best held-out evaluation
    (the weights it wrote) beats the reference's 0.5 preference accuracy by ``min_gain``. A
    round without held-out pairs (too few prompts to split) is not gated.
    """
    if heldout_pairs == 0 or not result.evals:
        return None
    best = result.best_eval
    if best is None or result.best_step == 0:
        return (
            "no held-out evaluation improved on the parent (held-out loss never fell below "
            "its starting ln 2): no candidate. More or clearer votes, or a lower learning rate, "
            "may help."
        )
    if best.accuracy < 0.5 + min_gain:
        return (
            f"held-out preference accuracy {best.accuracy:.3f} (best, at step "
            f"{result.best_step}) does not beat 0.5 by min_heldout_gain={min_gain:g}: the "
            "round did not learn what its annotators prefer, so it produces no candidate"
        )
    return None


def _finite(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


# ---------------------------------------------------------------------------- files
def _upload_adapter(artifacts: ObjectStore, src: Path, rel: str) -> str:
    """Write the local file ``src`` at ``rel`` in the artifact store (atomically: a temporary
    file and a rename on disk, one PUT or multipart upload on S3); returns the SHA-256 of what
    the store holds, read back."""
    artifacts.put_file(rel, src)
    return artifacts.sha256(rel)


# ---------------------------------------------------------------------------- the round
def run_round(
    round_id: int,
    session_factory: SessionFactory,
    settings: Settings,
    *,
    task_id: str | None = None,
    auto_publish: bool | None = None,
) -> None:
    """Run a training round to a finished state (see the module docstring); idempotent.

    Args:
        round_id: the committed round's id.
        session_factory: opens write sessions.
        settings: data directories and the base model.
        task_id: the Celery task id, which becomes the round's owner (a redelivery of the same
            task takes over its own round); default: a fresh id.
        auto_publish: publish the new version when the judge improved; default
            ``settings.auto_publish`` (``PREFLOOP_AUTO_PUBLISH``, off by default).
    """
    owner = task_id or f"direct-{uuid.uuid4()}"
    claim = _claim(session_factory, round_id, owner)
    if claim is None:
        return
    if auto_publish is None:
        auto_publish = settings.auto_publish
    log.info("round %s: attempt %d under %s", round_id, claim.attempt, owner)
    try:
        with _Heartbeat(session_factory, claim) as heartbeat:
            _execute(claim, session_factory, settings, heartbeat, auto_publish)
    except _NotOwner as exc:
        log.info("round %s: %s; stopping without changes", round_id, exc)
        if _current_status(session_factory, round_id) == RoundStatus.cancelled:
            shutil.rmtree(work_dir(settings, round_id), ignore_errors=True)
            remove_unpublished(artifact_store(settings), round_id)
    except RoundFailed as exc:
        _fail(session_factory, claim, settings, str(exc))
    except OperationalError:
        # The database went away or stayed locked: leave the round running under this task, so
        # that a retry of the task (same id) resumes it from its checkpoint, and the sweeper
        # re-queues it if no retry comes.
        log.exception("round %s: database error; leaving it for a retry", round_id)
        raise
    except Exception as exc:  # noqa: BLE001 - every error is stored on the round
        log.exception("round %s failed", round_id)
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        _fail(session_factory, claim, settings, detail)


def _fail(session_factory: SessionFactory, claim: _Claim, settings: Settings, error: str) -> None:
    ok = _set(
        session_factory,
        claim,
        ACTIVE,
        status=RoundStatus.failed,
        error=error[:10000],
        finished_at=_now(),
    )
    if ok:
        log.warning("round %s failed: %s", claim.round_id, error)
        shutil.rmtree(work_dir(settings, claim.round_id), ignore_errors=True)
        remove_unpublished(artifact_store(settings), claim.round_id)


def _execute(
    claim: _Claim,
    session_factory: SessionFactory,
    settings: Settings,
    heartbeat: _Heartbeat,
    auto_publish: bool,
) -> None:
    from worker.alignment.trainer import (
        ResumeMismatchError,
        TrainingCancelled,
        TrainingDiverged,
        train,
    )

    cfg = train_config(claim.config)
    rc = RoundConfig.model_validate(claim.config)
    artifacts = artifact_store(settings)

    with session_factory() as session:
        parent_id = claim.parent_version_id
        if parent_id is None:
            serving = version_service.serving_version(session)
            if serving is None:
                raise RoundFailed("no parent version: nothing is published")
            parent_id = serving.id
        parent = session.get(ModelVersion, parent_id)
        if parent is None:
            raise RoundFailed(f"parent version {parent_id} not found")
        parent_base = parent.base_model
        flagged = (
            frozenset(
                quality_report(session, settings, max_vote_id=claim.snapshot_max_vote_id).flagged()
            )
            if rc.exclude_flagged
            else frozenset()
        )
        rows, label_counts = snapshot_rows(
            session,
            max_vote_id=claim.snapshot_max_vote_id,
            include_ties=cfg.include_ties,
            label_rule=rc.label_rule,
            exclude_users=flagged,
            data_source=rc.data_source,
        )
        chain = model_registry.lineage(session, parent_id, artifacts)
        session.rollback()
    # Images and the model load outside any transaction (SQLite write sessions lock the file).
    snapshot = load_snapshot(rows, settings)
    # Held-out pairs, split by prompt (no prompt on both sides; the same split on a retry).
    train_pairs, heldout = split_by_prompt(snapshot.pairs, rc.holdout_fraction, seed=rc.seed)
    heldout = [p for p in heldout if not p.tie]
    if rc.holdout_fraction > 0 and not heldout:
        log.warning(
            "round %s: too few prompts to hold out %.0f%% of the pairs; training without "
            "held-out evaluation",
            claim.round_id,
            100 * rc.holdout_fraction,
        )
    trainable = sum(1 for p in train_pairs if cfg.include_ties or not p.tie)
    if trainable < rc.min_pairs:
        raise RoundFailed(
            f"only {trainable} training pairs in the snapshot (votes <= "
            f"{claim.snapshot_max_vote_id}); the config asks for at least {rc.min_pairs}"
        )
    steps = epoch_capped_steps(rc.steps, trainable, rc.batch_size, rc.grad_accum, rc.max_epochs)
    if steps < rc.steps:
        log.info(
            "round %s: %s pairs allow %s steps of %s at max_epochs=%s",
            claim.round_id,
            trainable,
            steps,
            rc.steps,
            rc.max_epochs,
        )
        cfg = cfg.replace(steps=steps, lr_warmup_steps=min(cfg.lr_warmup_steps, steps))
        if not _set(session_factory, claim, (RoundStatus.running,), total_steps=steps):
            raise _NotOwner("the round was cancelled or taken over before training")
    backbone = model_registry.load_chain(chain, fresh=True)

    base_metrics = {
        "pairs": trainable,
        "heldout_pairs": len(heldout),
        "votes": snapshot.votes,
        "labels": label_counts,
        "parent_version_id": parent_id,
        "attempt": claim.attempt,
        "steps_requested": rc.steps,
        "epochs": round(steps * rc.batch_size * rc.grad_accum / max(1, trainable), 3),
    }
    probe = fidelity_probe_for(parent_base, rc, heldout, settings)
    if probe is not None:
        base_metrics["fidelity_probe"] = {"metric": probe.name, "units": len(probe)}
    writer = _ProgressWriter(session_factory, claim, cfg.steps, base_metrics)
    should_stop = _StopCheck(session_factory, claim, heartbeat)
    out_dir = work_dir(settings, claim.round_id)
    started = time.monotonic()

    def attempt(resume: bool) -> Any:
        return train(
            backbone,
            train_pairs,
            cfg,
            output_dir=out_dir,
            progress=writer,
            should_stop=should_stop,
            resume=resume,
            progress_bar=False,
            heldout=heldout,
            on_eval=writer.on_eval,
            fidelity_probe=probe,
        )

    try:
        try:
            result = attempt(resume=True)
        except ResumeMismatchError as exc:
            log.warning(
                "round %s: checkpoint not resumable (%s); starting over", claim.round_id, exc
            )
            result = attempt(resume=False)
    except TrainingCancelled:
        writer.flush()
        if should_stop.reason == "cancelled":
            log.info(
                "round %s cancelled at step %s", claim.round_id, writer.last and writer.last.step
            )
            shutil.rmtree(out_dir, ignore_errors=True)
            return
        raise _NotOwner("the round is no longer ours") from None
    except TrainingDiverged as exc:
        writer.flush()
        raise RoundFailed(f"training diverged at step {exc.step}: {exc.reason}") from None
    if result.resumed_from is not None:
        # A resumed run's history includes the steps before its checkpoint, some of which the
        # dead worker may not have written: write them all.
        writer.pending = list(result.history)
    writer.flush()
    train_seconds = time.monotonic() - started

    for e in result.evals:  # a resumed run's evaluations before its checkpoint too
        writer.on_eval(e)
    metrics = writer.summary()
    metrics.update(
        steps=result.steps,
        train_seconds=round(train_seconds, 2),
        resumed_from=result.resumed_from,
        finetune=result.finetune,
        best_step=result.best_step,
        stop_reason=result.stop_reason,
    )
    if result.best_eval is not None:
        metrics["heldout_best"] = heldout_point(result.best_eval)
    verdict = candidate_verdict(result, len(heldout), rc.min_heldout_gain)
    if not _set(
        session_factory,
        claim,
        (RoundStatus.running,),
        status=RoundStatus.evaluating,
        step=result.steps,
        progress=1.0,
        metrics=metrics,
    ):
        raise _NotOwner("the round was cancelled or taken over before evaluation")

    if verdict is not None:
        metrics.update(candidate=False, no_candidate_reason=verdict)
        if not _set(
            session_factory,
            claim,
            (RoundStatus.evaluating,),
            status=RoundStatus.succeeded,
            finished_at=_now(),
            metrics=metrics,
        ):
            raise _NotOwner("the round was cancelled or taken over during evaluation")
        log.info("round %s: %s", claim.round_id, verdict)
        shutil.rmtree(out_dir, ignore_errors=True)
        return
    metrics["candidate"] = True
    if model_registry.is_builtin(parent_base) and rc.eval_prompts > 0:
        metrics.update(evaluate_against_parent(backbone, rc.eval_prompts))
    elif not model_registry.is_builtin(parent_base) and auto_metrics.configured(settings):
        metrics.update(auto_metrics.round_metrics(backbone, [p.prompt for p in heldout], settings))
    prefix = attempt_prefix(claim.round_id, claim.attempt)
    metrics["validation_samples"] = _render_samples(
        backbone, parent_base, [p.prompt for p in heldout], artifacts, prefix, claim.round_id
    )
    _publish_candidate(
        claim,
        session_factory,
        settings,
        artifacts,
        prefix,
        result,
        metrics,
        parent_id,
        parent_base,
        auto_publish,
    )
    shutil.rmtree(out_dir, ignore_errors=True)


def _render_samples(
    backbone: Any,
    base_model: str,
    heldout_prompts: list[str],
    artifacts: ObjectStore,
    prefix: str,
    round_id: int,
) -> int:
    """Renders the validation grid (parent | candidate, same seeds) into a local temporary
    directory and uploads it beside the version's adapter (``<prefix>/samples/``, the manifest
    last); returns how many prompts it shows. A failure is logged, never fails the round."""
    from backend.model_family import family_of
    from worker.validation_grid import (
        MANIFEST,
        SAMPLES_DIRNAME,
        render_validation_grid,
        sampler_for,
        validation_prompts,
        validation_seeds,
    )

    family = family_of(base_model)
    prompts = validation_prompts(family.name if family else "", heldout_prompts)
    if not prompts:
        return 0

    def sample_parent(p: list[str], s: list[int]) -> list[Any]:
        with model_registry.parent_view(backbone) as parent_model:
            return sampler_for(parent_model)(p, s)

    try:
        with tempfile.TemporaryDirectory(prefix=f"samples-{round_id}-") as tmp:
            local = Path(tmp) / SAMPLES_DIRNAME
            render_validation_grid(
                sampler_for(backbone), sample_parent, prompts, validation_seeds(len(prompts)), local
            )
            artifacts.put_dir(f"{prefix}/{SAMPLES_DIRNAME}", local, last=MANIFEST)
    except Exception:  # noqa: BLE001 - the images are for people; the round stands without them
        log.exception("round %s: validation samples failed", round_id)
        return 0
    return len(prompts)


def _publish_candidate(
    claim: _Claim,
    session_factory: SessionFactory,
    settings: Settings,
    artifacts: ObjectStore,
    prefix: str,
    result: Any,
    metrics: dict[str, Any],
    parent_id: int,
    base_model: str,
    auto_publish: bool,
) -> None:
    name = version_name(claim.round_id)
    filename = FULL_WEIGHTS_FILENAME if result.finetune == "full" else ADAPTER_FILENAME
    rel = f"{prefix}/{filename}"
    sha = _upload_adapter(artifacts, Path(result.adapter_path), rel)
    if sha != result.adapter_sha256:
        artifacts.delete_tree(prefix)
        raise RoundFailed(
            f"adapter copy at {artifacts.url}/{rel} has sha256 {sha}, trainer wrote "
            f"{result.adapter_sha256}"
        )
    from backend.services import publishing  # the publish policy (docs/publishing.md)

    with session_factory() as session:
        rnd = session.scalars(
            select(TrainingRound).where(TrainingRound.id == claim.round_id).with_for_update()
        ).first()
        if (
            rnd is None
            or rnd.celery_task_id != claim.owner
            or RoundStatus(rnd.status) != RoundStatus.evaluating
        ):
            session.rollback()
            artifacts.delete_tree(prefix)  # ours alone: the new owner writes under its own
            raise _NotOwner("the round was cancelled or taken over during evaluation")
        version = ModelVersion(
            name=name,
            parent_id=parent_id,
            base_model=base_model,
            adapter_path=rel,
            adapter_sha256=sha,
            status=VersionStatus.candidate,
            metrics=metrics,
            created_by_round=claim.round_id,
        )
        session.add(version)
        session.flush()
        # The policy acts in this transaction: publish (metric), retire, or open the A/B gate.
        outcome = publishing.on_candidate(session, version, settings, auto_publish=auto_publish)
        publish = outcome.published
        now = _now()
        rnd.status = RoundStatus.succeeded
        rnd.version_id = version.id
        rnd.metrics = {
            **metrics,
            "version_id": version.id,
            "published": publish,
            "publish_policy": outcome.policy,
            "policy_action": outcome.action,
            "policy_reason": outcome.reason,
        }
        rnd.progress = 1.0
        rnd.finished_at = now
        rnd.updated_at = now
        session.commit()
    # Committed: what earlier attempts of this round left is unreferenced for good.
    remove_unpublished(artifacts, claim.round_id, keep=prefix)
    log.info(
        "round %s succeeded: version %s (%s)%s",
        claim.round_id,
        name,
        sha[:12],
        ", published" if publish else "",
    )
