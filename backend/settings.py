"""Settings of the API process, read from ``PREFLOOP_*`` environment variables.

Nothing is read at import time: call :func:`get_settings` (cached) or build ``Settings(...)``
explicitly (tests do). The CLI calls :func:`load_settings_or_exit`, which turns a validation
error into one line per bad variable, e.g. ``PREFLOOP_PORT: Input should be a valid integer``,
and exits with status 2.

*Local mode* is a SQLite database (the default, with nothing configured): everything lives
under ``data_dir`` (``./var``), the Celery broker is kombu's SQLAlchemy transport on a SQLite
file (no server), a missing secret key is generated and persisted in ``data_dir``, a missing
admin password is generated at first start and printed once, and open sign-up is on.
Otherwise (PostgreSQL) the admin password and the secret key must be given.
"""

from __future__ import annotations

import os
import secrets
import sys
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from backend.ab_test import ABSettings

ENV_PREFIX = "PREFLOOP_"


class SettingsError(RuntimeError):
    """A setting is missing or inconsistent; the message starts with the variable's name."""


class Settings(BaseSettings):
    """Every knob of the API process. Each field is the variable ``PREFLOOP_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    # Storage
    data_dir: Path = Field(Path("./var"), description="Root of images, models and local DBs.")
    storage_url: str | None = Field(
        None,
        description="Where images and version artifacts live (backend/storage.py): unset means "
        "local disk under data_dir (images/, models/versions/); s3://bucket/prefix means an "
        "S3-compatible object store (s3_* settings below, or the standard AWS_* variables). "
        "data_dir still holds scratch files and caches.",
    )
    s3_endpoint_url: str | None = Field(
        None, description="The S3 API endpoint of a non-AWS store (MinIO, Ceph, R2...). Unset: AWS."
    )
    s3_region: str | None = Field(None, description="The bucket's region. Unset: botocore's.")
    s3_access_key_id: SecretStr | None = Field(
        None,
        description="With s3_secret_access_key. Unset: botocore's chain (AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, an instance or pod role).",
    )
    s3_secret_access_key: SecretStr | None = Field(None, validate_default=True)
    image_cache_mb: int = Field(
        64,
        ge=0,
        le=65536,
        description="Object storage: megabytes of image bytes each API process keeps in memory "
        "(images never change; each is served to several annotators). 0: off.",
    )
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; unset means SQLite at <data_dir>/prefloop.db."
    )
    db_pool_size: int = Field(20, ge=1, le=500, description="PostgreSQL pool size.")
    db_max_overflow: int = Field(20, ge=0, le=500)
    broker_url: str | None = Field(
        None, description="Celery broker; unset means sqla+sqlite:///<data_dir>/broker.db."
    )
    result_backend: str | None = Field(
        None, description="Celery result backend; unset means db+sqlite:///<data_dir>/results.db."
    )

    # HTTP
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    max_upload_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="Any request body.")
    import_max_rows: int = Field(200_000, ge=1)

    # Auth
    admin_username: str = Field("admin", min_length=1, max_length=64)
    admin_password: SecretStr | None = None
    secret_key: SecretStr | None = None
    token_ttl_seconds: int = Field(12 * 3600, ge=60)
    open_signup: bool | None = Field(None, description="Unset: on in local mode, else off.")
    signup_invites: bool = Field(
        False,
        description="Sign-up (when open) also needs a single-use invite code that an admin "
        "created with POST /api/v1/invites.",
    )
    login_rate_limit_attempts: int = Field(10, ge=1)
    login_rate_limit_window_seconds: float = Field(60.0, gt=0)
    register_rate_limit_attempts: int = Field(
        5, ge=1, description="Registrations per client IP per register_rate_limit_window."
    )
    register_rate_limit_window_seconds: float = Field(3600.0, gt=0)
    rate_limit_redis_url: str | None = Field(
        None,
        description="Redis (redis://...) shared by every API process and host for the login "
        "and registration limits. Unset: each process counts alone.",
    )
    trusted_proxies: str = Field(
        "",
        description="Comma-separated IPs or CIDR networks of reverse proxies whose "
        "X-Forwarded-For is believed. Empty: the peer address is the client.",
    )
    argon2_time_cost: int = Field(3, ge=1, le=20)
    argon2_memory_kib: int = Field(65536, ge=8, le=4 * 1024 * 1024)

    # Annotation
    pair_pool_target: int = Field(200, ge=0, description="Unvoted pairs kept ready.")
    pair_overlap: int = Field(3, ge=1, description="Annotators wanted per pair.")
    gold_fraction: float = Field(0.1, ge=0.0, le=1.0)
    pair_active_share: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Share of the pool's within-version pairs chosen actively: per batch, the "
        "most different of pair_active_candidates times as many candidate pairs "
        "(docs/active.md). 0: every pair drawn uniformly (random prompt, random seeds).",
    )
    pair_active_candidates: int = Field(
        4,
        ge=2,
        le=16,
        description="Candidate pairs sampled per actively chosen pair: the sampling cost of an "
        "active pair, in uniform pairs.",
    )
    daily_vote_cap: int = Field(2000, ge=0, description="Pairs served per user per UTC day.")
    weekly_vote_cap: int = Field(10000, ge=0, description="Pairs served per user per 7 days.")
    retry_after_seconds: int = Field(5, ge=1, description="Retry-After when no pair is ready.")

    # Data quality (docs/data-quality.md)
    fast_vote_ms: int = Field(
        700,
        ge=0,
        le=600_000,
        description="A vote answered in less than this many milliseconds is implausibly fast; "
        "an annotator with at least half of their timed votes this fast is flagged. 0: off.",
    )
    gold_accuracy_floor: float = Field(
        0.6,
        ge=0.0,
        le=1.0,
        description="An annotator with at least 5 gold votes and a lower gold accuracy is flagged.",
    )
    kappa_min_overlap: int = Field(
        20, ge=2, description="Pairs two annotators must share for their Cohen's kappa."
    )
    quality_max_age_seconds: float = Field(
        30.0,
        ge=0.0,
        le=86_400.0,
        description="While votes arrive, the reliability / agreement report of /users and "
        "/stats is recomputed at most this often (0: after every vote).",
    )

    # Training
    base_model: str = Field("builtin:shapes", min_length=1)
    round_every_n_pairs: int = Field(
        0, ge=0, description="Schedule a round every N new voted pairs; 0 disables."
    )
    auto_publish: bool = Field(
        False,
        description="Legacy switch: true means publish_policy 'metric' (the judge decides, "
        "with a margin and an interval).",
    )

    # Publishing: the A/B gate and the policy that acts on it (docs/publishing.md)
    publish_policy: Literal["human", "metric", "manual"] | None = Field(
        None,
        description="human: the blind A/B gate publishes on promote and retires on reject; "
        "metric: the round's automatic metric decides (lower end of its 95% interval above "
        "metric_margin); manual: an admin decides. Unset: metric when auto_publish, else human.",
    )
    metric_margin: float = Field(
        0.0,
        ge=-1.0,
        le=1.0,
        description="metric policy: publish when the lower end of the 95% interval of the "
        "automatic metric's difference (candidate - parent: the judge's score, else PickScore, "
        "else CLIP score) is above this.",
    )
    # Automatic metrics of real models (worker/auto_metrics.py): local directories only
    clip_model_path: Path | None = Field(
        None,
        description="A local transformers CLIP directory (model, tokenizer, image processor): "
        "rounds on SD models record the candidate's CLIP score against its parent.",
    )
    pickscore_model_path: Path | None = Field(
        None,
        description="A local PickScore directory (CLIP model, tokenizer, image processor): "
        "rounds on SD models record PickScore against the parent (the metric policy's "
        "preference metric).",
    )
    aesthetic_model_path: Path | None = Field(
        None,
        description="LAION's aesthetic predictor state dict (.pth/.safetensors), run on the "
        "embeddings of clip_model_path (which it needs: CLIP ViT-L/14 for the released one).",
    )
    metric_prompts: int = Field(
        32, ge=1, le=1024, description="Held-out prompts (one seed each) the metrics render."
    )
    ab_alpha: float = Field(
        0.05, gt=0.0, lt=1.0, description="A/B gate: false-promotion (and false-rollback) rate."
    )
    ab_min_effect: float = Field(
        0.1, gt=0.0, lt=0.5, description="A/B gate: δ; powered against a win rate of 1/2 + δ."
    )
    ab_budget: int = Field(
        400, ge=1, le=1_000_000, description="A/B gate: votes after which it is inconclusive."
    )
    ab_power: float = Field(0.9, gt=0.0, lt=1.0, description="A/B gate: power at 1/2 + δ.")
    ab_share: float = Field(
        0.25,
        ge=0.0,
        le=0.9,
        description="Share of served pairs that are candidate-vs-parent A/B pairs while a "
        "gate is open.",
    )
    ab_live_share: float = Field(
        0.1,
        ge=0.0,
        le=0.9,
        description="Share of served pairs that compare the published version with its "
        "parent (the live monitor) after publishing.",
    )

    # Logging
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_json: bool = True
    worker_metrics_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="A Celery worker serves its Prometheus /metrics on this port (unset: none).",
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, v: object) -> object:
        return v.upper() if isinstance(v, str) else v

    @field_validator("publish_policy", mode="after")
    @classmethod
    def _policy_agrees_with_auto_publish(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None and v != "metric" and info.data.get("auto_publish"):
            raise ValueError(
                f"{v!r} conflicts with {ENV_PREFIX}AUTO_PUBLISH=true, which means 'metric'; "
                "unset one of them"
            )
        return v

    @field_validator("clip_model_path", "pickscore_model_path", "aesthetic_model_path")
    @classmethod
    def _existing_path(cls, v: Path | None) -> Path | None:
        if v is not None and not v.exists():
            raise ValueError(f"no such file or directory: {v} (nothing is downloaded)")
        return v

    @field_validator("aesthetic_model_path")
    @classmethod
    def _aesthetic_needs_clip(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        if (
            v is not None
            and "clip_model_path" in info.data
            and info.data["clip_model_path"] is None
        ):
            raise ValueError("needs PREFLOOP_CLIP_MODEL_PATH (the CLIP model it runs on)")
        return v

    @field_validator("trusted_proxies")
    @classmethod
    def _proxy_networks(cls, v: str) -> str:
        import ipaddress

        for part in (p.strip() for p in v.split(",")):
            if part:
                try:
                    ipaddress.ip_network(part, strict=False)
                except ValueError:
                    raise ValueError(f"{part!r} is not an IP address or network") from None
        return v

    @field_validator("storage_url")
    @classmethod
    def _storage_url(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        v = v.strip()
        scheme, sep, rest = v.partition("://")
        if not sep:
            return v  # a local directory
        if scheme == "file":
            return v
        if scheme in ("s3", "s3a"):
            if not rest.strip("/"):
                raise ValueError("s3:// needs a bucket: s3://bucket or s3://bucket/prefix")
            return "s3://" + rest.strip("/")
        raise ValueError(f"unsupported scheme {scheme!r}: a path, file://... or s3://bucket/prefix")

    @field_validator("s3_secret_access_key")
    @classmethod
    def _s3_key_pair(cls, v: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if (v is None) != (info.data.get("s3_access_key_id") is None):
            raise ValueError("set both PREFLOOP_S3_ACCESS_KEY_ID and this, or neither")
        return v

    @field_validator("secret_key")
    @classmethod
    def _long_secret(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and len(v.get_secret_value()) < 32:
            raise ValueError("must be at least 32 characters")
        return v

    @field_validator("database_url")
    @classmethod
    def _normalise_db_url(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        v = v.strip()
        for prefix in ("postgresql://", "postgres://"):
            if v.startswith(prefix):
                return "postgresql+psycopg://" + v[len(prefix) :]
        if not (v.startswith("postgresql+") or v.startswith("sqlite")):
            raise ValueError("only PostgreSQL (postgresql://...) and SQLite URLs are supported")
        return v

    # Derived values -------------------------------------------------------------------------

    @property
    def effective_publish_policy(self) -> str:
        """``publish_policy``; unset: ``metric`` when ``auto_publish``, else ``human``."""
        if self.publish_policy is not None:
            return self.publish_policy
        return "metric" if self.auto_publish else "human"

    @property
    def ab_settings(self) -> ABSettings:
        """The A/B gate's settings (validated by their fields' bounds)."""
        return ABSettings(
            alpha=self.ab_alpha,
            min_effect=self.ab_min_effect,
            budget=self.ab_budget,
            power=self.ab_power,
        )

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'prefloop.db'}"

    @property
    def is_local(self) -> bool:
        """Local mode: SQLite, embedded broker, generated secrets."""
        return self.db_url.startswith("sqlite")

    @property
    def storage_is_local(self) -> bool:
        """Images and artifacts on local disk (no ``storage_url``, or a ``file://`` one)."""
        return self.storage_url is None or not self.storage_url.startswith(("s3://", "s3a://"))

    @property
    def images_dir(self) -> Path:
        """The local image directory of the default storage (see :attr:`storage_url`)."""
        return self.data_dir / "images"

    @property
    def models_dir(self) -> Path:
        """Local: the rounds' work directories, and version artifacts of the default storage."""
        return self.data_dir / "models"

    @property
    def celery_broker_url(self) -> str:
        from backend.queues import broker_url

        return broker_url(self.broker_url, self.data_dir)

    @property
    def celery_result_backend(self) -> str:
        from backend.queues import result_backend_url

        return result_backend_url(self.result_backend, self.data_dir)

    @property
    def trusted_proxy_list(self) -> list[str]:
        """``trusted_proxies`` as a list of addresses / networks (empty: trust none)."""
        return [p.strip() for p in self.trusted_proxies.split(",") if p.strip()]

    @property
    def signup_open(self) -> bool:
        return self.is_local if self.open_signup is None else self.open_signup

    def require_server_secrets(self) -> None:
        """Outside local mode, the admin password and the secret key must be configured."""
        if self.is_local:
            return
        if self.admin_password is None:
            raise SettingsError(
                f"{ENV_PREFIX}ADMIN_PASSWORD: must be set when the database is not SQLite"
            )
        if self.secret_key is None:
            raise SettingsError(
                f"{ENV_PREFIX}SECRET_KEY: must be set when the database is not SQLite"
            )

    def jwt_secret(self) -> str:
        """The token-signing key: configured, or generated once and kept in data_dir (local)."""
        if self.secret_key is not None:
            return self.secret_key.get_secret_value()
        if not self.is_local:
            raise SettingsError(
                f"{ENV_PREFIX}SECRET_KEY: must be set when the database is not SQLite"
            )
        path = self.data_dir / "secret_key"
        try:
            return path.read_text().strip()
        except FileNotFoundError:
            pass
        self.data_dir.mkdir(parents=True, exist_ok=True)
        key = secrets.token_urlsafe(48)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(key)
        try:
            os.link(tmp, path)  # first writer wins; a concurrent starter reads the winner's key
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
        return path.read_text().strip()


def format_validation_error(exc: ValidationError) -> str:
    """One ``PREFLOOP_<NAME>: message`` line per error."""
    lines = []
    for err in exc.errors():
        name = str(err["loc"][0]).upper() if err["loc"] else "SETTINGS"
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{ENV_PREFIX}{name}: {msg}")
    return "\n".join(lines)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once from the environment."""
    return Settings()


def load_settings_or_exit(*, require_secrets: bool = False) -> Settings:
    """Like :func:`get_settings`, but a bad value prints which variable and exits (status 2).

    ``require_secrets``: also apply :meth:`Settings.require_server_secrets` (the API server).
    """
    try:
        settings = get_settings()
        if require_secrets:
            settings.require_server_secrets()
    except ValidationError as exc:
        print(f"prefloop: invalid settings:\n{format_validation_error(exc)}", file=sys.stderr)
        raise SystemExit(2) from None
    except SettingsError as exc:
        print(f"prefloop: invalid settings:\n{exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return settings
