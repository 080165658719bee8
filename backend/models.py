"""SQLAlchemy 2 typed models: the schema of everything Prefloop stores.

The Alembic revisions in ``migrations/versions`` are written to match these models exactly;
``tests/backend/test_migrations.py`` proves it on PostgreSQL and SQLite.

Hot paths and the indexes behind them:

- ``GET /pairs/next``: ``ix_pairs_pick (active, kind, rand_key)`` finds a random active pair,
  ``uq_pair_assignments_user_pair`` makes "not yet served to this user" an index probe, and
  ``ix_pair_assignments_user_served (user_id, served_at)`` counts the daily / weekly cap.
- ``POST /votes``: one insert guarded by ``uq_votes_user_pair`` and
  ``uq_votes_user_client_vote`` (idempotency and concurrency safety come from them).
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSON, datetime: DateTime(timezone=True)}


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    """A portable enum: VARCHAR plus a CHECK constraint, values stored as their strings."""
    return Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=max(len(m.value) for m in cls),  # type: ignore[misc]
        values_callable=lambda e: [m.value for m in e],
        validate_strings=True,
    )


class UserRole(enum.StrEnum):
    annotator = "annotator"
    admin = "admin"


class UserStatus(enum.StrEnum):
    active = "active"
    banned = "banned"
    #: Keeps voting, unaware; the votes never train or count (only ``active`` annotators'
    #: votes reach training, A/B tests, rankings and agreement).
    shadow_banned = "shadow_banned"


class VersionStatus(enum.StrEnum):
    candidate = "candidate"
    published = "published"
    retired = "retired"


class PairKind(enum.StrEnum):
    within_version = "within_version"
    cross_version = "cross_version"
    gold = "gold"
    #: A blind A/B pair of a version under test against its parent (``Pair.ab_test_id``):
    #: never training data, never a within-version pair.
    ab = "ab"


class ABPhase(enum.StrEnum):
    """Which comparison an A/B test is: the gate before a candidate serves, or the live
    monitor of a published version."""

    gate = "gate"
    live = "live"


class ABState(enum.StrEnum):
    """Where an A/B test stands. ``open`` until the first decision, which is final.

    Gate: ``promote`` / ``reject`` / ``inconclusive`` (the sequential test's own states,
    ``backend.ab_test.decide``), or ``overridden`` (an admin published or rejected the
    candidate first, or it stopped being a candidate). Live: ``rollback`` (significantly worse
    than its parent: rolled back) or ``closed`` (it stopped serving for another reason)."""

    open = "open"
    promote = "promote"
    reject = "reject"
    inconclusive = "inconclusive"
    overridden = "overridden"
    rollback = "rollback"
    closed = "closed"


class GoldAnswer(enum.StrEnum):
    """Which image of a gold pair is the right answer."""

    a = "a"
    b = "b"


class Choice(enum.StrEnum):
    left = "left"
    right = "right"
    tie = "tie"
    both_bad = "both_bad"
    skip = "skip"


class RoundStatus(enum.StrEnum):
    queued = "queued"
    running = "running"
    evaluating = "evaluating"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (RoundStatus.succeeded, RoundStatus.failed, RoundStatus.cancelled)


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[UserRole] = mapped_column(_enum(UserRole, "user_role"), default=UserRole.annotator)
    status: Mapped[UserStatus] = mapped_column(
        _enum(UserStatus, "user_status"), default=UserStatus.active
    )
    daily_cap: Mapped[int | None] = mapped_column(Integer, doc="Overrides the setting.")
    weekly_cap: Mapped[int | None] = mapped_column(Integer, doc="Overrides the setting.")
    token_version: Mapped[int] = mapped_column(
        Integer,
        default=0,
        server_default=text("0"),
        doc="Tokens carry the version they were issued at; bumping it (password or role "
        "change, ban, logout) ends every session of the user.",
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Invite(Base):
    """A single-use sign-up code (``PREFLOOP_SIGNUP_INVITES``): only its SHA-256 is stored."""

    __tablename__ = "invites"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    code_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_by: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    used_by: Mapped[int | None] = mapped_column(ForeignKey("users.id"), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    used_at: Mapped[datetime | None] = mapped_column()


class Prompt(Base):
    __tablename__ = "prompts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    text: Mapped[str] = mapped_column(String(2000), unique=True)
    source: Mapped[str | None] = mapped_column(String(128))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (
        # At most one serving version: publishing is one transaction that retires the old one.
        Index(
            "uq_model_versions_one_published",
            "status",
            unique=True,
            sqlite_where=text("status = 'published'"),
            postgresql_where=text("status = 'published'"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"), index=True)
    base_model: Mapped[str] = mapped_column(String(1024))
    adapter_path: Mapped[str | None] = mapped_column(String(1024))
    adapter_sha256: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[VersionStatus] = mapped_column(
        _enum(VersionStatus, "version_status"), default=VersionStatus.candidate
    )
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_by_round: Mapped[int | None] = mapped_column(
        ForeignKey("training_rounds.id", use_alter=True), index=True
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    published_at: Mapped[datetime | None] = mapped_column()


class Image(Base):
    __tablename__ = "images"
    __table_args__ = (Index("ix_images_version_prompt", "version_id", "prompt_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"), index=True)
    seed: Mapped[int] = mapped_column(BigInteger)
    cfg: Mapped[float] = mapped_column(Float)
    steps: Mapped[int] = mapped_column(Integer)
    sampler: Mapped[str] = mapped_column(String(64))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    storage_path: Mapped[str] = mapped_column(String(512), doc="Relative to the images dir.")
    media_type: Mapped[str] = mapped_column(String(64), default="image/png")
    external_uid: Mapped[str | None] = mapped_column(
        String(128), doc="An imported image's uid in its dataset (Pick-a-Pic's image_0_uid)."
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ABTest(Base):
    """One blind comparison of a version with its parent (``docs/publishing.md``).

    The tally while open is read from the votes on its pairs (``Pair.ab_test_id``); the
    columns ``wins`` / ``losses`` / ``ties`` hold the tally the decision was made on, frozen
    with ``state`` at the first non-open state (later votes never change it)."""

    __tablename__ = "ab_tests"
    __table_args__ = (UniqueConstraint("version_id", "phase"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"), index=True)
    parent_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    phase: Mapped[ABPhase] = mapped_column(_enum(ABPhase, "ab_phase"))
    state: Mapped[ABState] = mapped_column(_enum(ABState, "ab_state"), default=ABState.open)
    policy: Mapped[str] = mapped_column(String(16), doc="human | metric | manual, at opening.")
    settings: Mapped[dict[str, Any]] = mapped_column(
        default=dict, doc="alpha, min_effect, budget, power: fixed when the test opens."
    )
    wins: Mapped[int] = mapped_column(Integer, default=0)
    losses: Mapped[int] = mapped_column(Integer, default=0)
    ties: Mapped[int] = mapped_column(Integer, default=0)
    reason: Mapped[str | None] = mapped_column(Text)
    action: Mapped[str | None] = mapped_column(
        String(32), doc="What followed the decision: published, retired, rolled_back, none."
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    decided_at: Mapped[datetime | None] = mapped_column()


class Pair(Base):
    __tablename__ = "pairs"
    __table_args__ = (Index("ix_pairs_pick", "active", "kind", "rand_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[PairKind] = mapped_column(_enum(PairKind, "pair_kind"))
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"), index=True)
    image_a_id: Mapped[int] = mapped_column(ForeignKey("images.id"), index=True)
    image_b_id: Mapped[int] = mapped_column(ForeignKey("images.id"), index=True)
    gold_answer: Mapped[GoldAnswer | None] = mapped_column(_enum(GoldAnswer, "gold_answer"))
    source: Mapped[str] = mapped_column(String(32), default="pool", doc="pool | import | gold")
    ab_test_id: Mapped[int | None] = mapped_column(
        ForeignKey("ab_tests.id"), index=True, doc="The A/B test of an ``ab`` pair."
    )
    active: Mapped[bool] = mapped_column(Boolean, default=True, doc="Still served.")
    rand_key: Mapped[float] = mapped_column(Float, doc="Uniform in [0,1): random pick order.")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class PairAssignment(Base):
    """A pair served to an annotator, with the side order they saw."""

    __tablename__ = "pair_assignments"
    __table_args__ = (
        UniqueConstraint("user_id", "pair_id"),
        Index("ix_pair_assignments_user_served", "user_id", "served_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    pair_id: Mapped[int] = mapped_column(ForeignKey("pairs.id", ondelete="CASCADE"), index=True)
    left_image_id: Mapped[int] = mapped_column(ForeignKey("images.id"))
    right_image_id: Mapped[int] = mapped_column(ForeignKey("images.id"))
    served_at: Mapped[datetime] = mapped_column(default=utcnow)


class Vote(Base):
    __tablename__ = "votes"
    __table_args__ = (
        UniqueConstraint("user_id", "pair_id"),
        UniqueConstraint("user_id", "client_vote_id"),
        Index("ix_votes_user_created", "user_id", "created_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    pair_id: Mapped[int] = mapped_column(ForeignKey("pairs.id", ondelete="CASCADE"), index=True)
    choice: Mapped[Choice] = mapped_column(_enum(Choice, "vote_choice"))
    winner_image_id: Mapped[int | None] = mapped_column(
        ForeignKey("images.id"), doc="Resolved from the served side order; null unless left/right."
    )
    client_vote_id: Mapped[str | None] = mapped_column(String(64))
    latency_ms: Mapped[int | None] = mapped_column(Integer)
    external_ranking_id: Mapped[int | None] = mapped_column(
        BigInteger, doc="An imported vote's id in its dataset (Pick-a-Pic's ranking_id)."
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class TrainingRound(Base):
    __tablename__ = "training_rounds"
    __table_args__ = (Index("ix_training_rounds_status", "status"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    status: Mapped[RoundStatus] = mapped_column(
        _enum(RoundStatus, "round_status"), default=RoundStatus.queued
    )
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    parent_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    snapshot_max_vote_id: Mapped[int] = mapped_column(Integer, default=0)
    snapshot_vote_count: Mapped[int] = mapped_column(Integer, default=0)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int] = mapped_column(Integer, default=0)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[str | None] = mapped_column(Text)
    version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    created_by: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    celery_task_id: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class RoundMetric(Base):
    """One logged training step of a round (the live loss curves)."""

    __tablename__ = "round_metrics"
    __table_args__ = (UniqueConstraint("round_id", "step"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("training_rounds.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    loss: Mapped[float | None] = mapped_column(Float)
    implicit_acc: Mapped[float | None] = mapped_column(Float)
    reward_margin: Mapped[float | None] = mapped_column(Float)
    extra: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


ALL_TABLES = [t.name for t in Base.metadata.sorted_tables]
