"""Request and response bodies of the v1 API, in families: ``XCreate`` (input),
``XPublic`` (one), ``XsPublic`` (a page: ``{data, count}``)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError

from backend.models import Choice, GoldAnswer, RoundStatus, UserRole, UserStatus, VersionStatus
from backend.services.common import as_utc
from backend.text_input import NoNul, stored_text

#: Every time in a response: UTC with its offset (SQLite hands back naive datetimes, which
#: would serialise without one and break the documented ``date-time`` format).
UtcDatetime = Annotated[datetime, AfterValidator(as_utc)]


def _json_integer(value: Any) -> Any:
    if isinstance(value, bool | str):
        raise PydanticCustomError("int_type", "Input should be a valid integer")
    return value


#: An integer of a request body as JSON Schema means it: ``3`` and ``3.0``, never ``true`` or
#: ``"3"`` (pydantic's lax mode would take both).
JsonInteger = BeforeValidator(_json_integer)
# Field first: constraints after a BeforeValidator are lost from the JSON Schema.
Cap = Annotated[int, Field(ge=0, le=10_000_000), JsonInteger]
RowId = Annotated[int, Field(ge=1, le=2**31 - 1), JsonInteger]
LatencyMs = Annotated[int, Field(ge=0, le=86_400_000), JsonInteger]

# Every text field of a request is a stored_text + NoNul (backend/text_input.py): a NUL character, a
# lone surrogate or an overlong value is a 422 naming the field.
Username = Annotated[
    str, stored_text(min_length=3, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$"), NoNul
]
Password = Annotated[str, stored_text(min_length=8, max_length=128), NoNul]
#: What a login form accepts (any stored account, whatever its age): no format rules.
LoginUsername = Annotated[str, stored_text(min_length=1, max_length=64), NoNul]
LoginPassword = Annotated[str, stored_text(min_length=1, max_length=1024), NoNul]
PromptText = Annotated[str, stored_text(min_length=1, max_length=2000), NoNul]
PromptSource = Annotated[str, stored_text(max_length=128), NoNul]
Reason = Annotated[str, stored_text(max_length=2000), NoNul]
LoginScope = Annotated[str, stored_text(max_length=1024), NoNul]
InviteCode = Annotated[str, stored_text(min_length=1, max_length=128), NoNul]


class Message(BaseModel):
    detail: str


class LoginForm(BaseModel):
    """The OAuth2 password flow's form (``application/x-www-form-urlencoded``)."""

    username: LoginUsername
    password: LoginPassword
    grant_type: Literal["password"] | None = None
    scope: LoginScope = ""


class Token(BaseModel):
    access_token: str
    token_type: Literal["bearer"] = "bearer"
    expires_in: int


# Users -------------------------------------------------------------------------------------


class UserRegister(BaseModel):
    model_config = ConfigDict(extra="forbid")
    username: Username
    password: Password
    invite_code: InviteCode | None = Field(
        None, description="Required when the server takes sign-ups by invite only."
    )


class UserCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    username: Username
    password: Password
    role: UserRole = UserRole.annotator
    daily_cap: Cap | None = None
    weekly_cap: Cap | None = None


class UserUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    status: UserStatus | None = None
    role: UserRole | None = None
    daily_cap: Cap | None = None
    weekly_cap: Cap | None = None
    password: Password | None = None


class InvitePublic(BaseModel):
    id: int
    code: str = Field(description="The single-use sign-up code; shown only now.")
    created_at: UtcDatetime


class UserPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    username: str
    role: UserRole
    status: UserStatus
    daily_cap: int | None
    weekly_cap: int | None
    created_at: UtcDatetime


class UserWithStats(UserPublic):
    votes: int
    votes_today: int
    served: int
    gold_seen: int
    gold_correct: int
    gold_accuracy: float | None
    agreement_with_majority: float | None
    p_value: float | None = Field(description="One-sided binomial test against the others.")
    outlier: bool | None
    fast_votes: int = Field(0, description="Votes faster than PREFLOOP_FAST_VOTE_MS.")
    timed_votes: int = Field(0, description="Votes with a recorded latency.")
    krippendorff_alpha: float | None = Field(
        None, description="Krippendorff's alpha of the comparisons involving this annotator."
    )
    flags: list[str] = Field(
        default_factory=list, description="Why the annotator is unreliable: gold, outlier, fast."
    )


class UsersPublic(BaseModel):
    data: list[UserWithStats]
    count: int


# Pairs and votes ---------------------------------------------------------------------------


class ImageRef(BaseModel):
    image_id: int
    url: str


class GoldMark(BaseModel):
    model_config = ConfigDict(extra="forbid")
    answer: GoldAnswer = Field(description="Which image of the pair is right: a or b.")


class GoldPairPublic(BaseModel):
    """A gold (control) pair, as its admin sees it."""

    model_config = ConfigDict(from_attributes=True)
    id: int
    kind: str
    prompt_id: int
    image_a_id: int
    image_b_id: int
    gold_answer: GoldAnswer
    active: bool


class PairPublic(BaseModel):
    """A pair as an annotator sees it: no version, no kind."""

    pair_id: int
    prompt: str
    left: ImageRef
    right: ImageRef


class VoteCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pair_id: RowId
    choice: Choice
    client_vote_id: str | None = Field(
        None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:\-]+$"
    )
    latency_ms: LatencyMs | None = None


class VotePublic(BaseModel):
    vote_id: int
    pair_id: int
    choice: Choice
    duplicate: bool = Field(description="True when this repeated an already stored vote.")


# Prompts ------------------------------------------------------------------------------------


class PromptCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: PromptText
    source: PromptSource | None = None


class PromptUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    active: bool = Field(description="Whether new images are drawn for this prompt.")


class PromptPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    text: str
    source: str | None
    active: bool
    created_at: UtcDatetime


class PromptsPublic(BaseModel):
    data: list[PromptPublic]
    count: int


class PromptsCreated(BaseModel):
    created: int = Field(description="New prompts stored.")
    existing: int = Field(description="Prompts skipped: already stored, or repeated.")


# Versions -----------------------------------------------------------------------------------


class VersionPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    name: str
    parent_id: int | None
    base_model: str
    status: VersionStatus
    metrics: dict[str, Any]
    adapter_sha256: str | None
    created_by_round: int | None
    created_at: UtcDatetime
    published_at: UtcDatetime | None


class VersionsPublic(BaseModel):
    data: list[VersionPublic]
    count: int


class VersionActionPublic(VersionPublic):
    """A version after publish / retire / reject / rollback, with what happened in words."""

    message: str = Field(description="What the action did.")
    notes: list[str] = Field(
        default_factory=list,
        description="Side effects: an open A/B gate closed as 'overridden', a live A/B test "
        "opened or closed.",
    )


class VersionReject(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: Reason | None = None


class VersionRollback(VersionReject):
    pass


class ABTestPublic(BaseModel):
    """One A/B test of a version against its parent."""

    test_id: int
    phase: Literal["gate", "live"] = Field(
        description="gate: a candidate before it serves; live: the published version."
    )
    state: Literal[
        "open", "promote", "reject", "inconclusive", "overridden", "rollback", "closed"
    ] = Field(description="open until the first decision, which is final.")
    parent_id: int
    policy: str = Field(description="The publish policy when the test opened.")
    battles: int = Field(description="Votes counted: wins + losses + ties (both-bad, skip not).")
    wins: int
    losses: int
    ties: int
    win_rate: float | None = Field(description="(wins + ties / 2) / battles; null before a vote.")
    interval: list[float] = Field(description="95% Wilson interval of the win rate (display).")
    budget: int | None = Field(description="gate: votes after which it is inconclusive.")
    votes_left: int | None = Field(description="gate: votes left in the budget (0 once decided).")
    reason: str
    action: str | None = Field(description="published, retired, rolled_back, none; null if open.")
    settings: dict[str, Any]
    opened_at: UtcDatetime
    decided_at: UtcDatetime | None
    votes_after_decision: int = Field(
        description="Votes that arrived after the decision (pairs served before it): not counted."
    )
    log_lr: float | None = None
    promote_at: float | None = None
    reject_at: float | None = None
    log_evalue: float | None = None
    rollback_at: float | None = None


class VersionABPublic(BaseModel):
    """``GET /versions/{id}/ab``: the version's blind A/B tests against its parent."""

    version_id: int
    name: str
    parent_id: int | None
    status: VersionStatus
    candidate: bool
    policy: str = Field(description="The publish policy in force: human, metric or manual.")
    state: str = Field(description="The gate's state, or 'none' when the version has no gate.")
    gate: ABTestPublic | None
    live: ABTestPublic | None
    metric: dict[str, Any] | None = Field(
        description="The metric policy's verdict (judge delta, 95% interval, margin), when the "
        "version has the metric."
    )


class VersionSamplePublic(BaseModel):
    """One validation prompt: the parent's and the candidate's image, same seed."""

    prompt: str
    seed: int
    parent_url: str
    candidate_url: str


class VersionSamplesPublic(BaseModel):
    """The validation grid a round rendered for this version (and its parent, same seeds).
    URLs are ``/api/v1/versions/{id}/samples/{filename}`` (admin bearer token)."""

    version_id: int
    parent_id: int | None
    prompts: list[VersionSamplePublic]
    grid_url: str | None
    created_at: UtcDatetime | None = None


# Rounds -------------------------------------------------------------------------------------


class RoundCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    config: dict[str, Any] | None = Field(
        None, description="Overrides of the defaults; see GET /api/v1/rounds/config-schema."
    )
    parent_version_id: RowId | None = Field(None, description="Defaults to the serving version.")


class RoundAccepted(BaseModel):
    round_id: int
    status: RoundStatus


class RoundPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    status: RoundStatus
    progress: float
    step: int
    total_steps: int
    metrics: dict[str, Any]
    version_id: int | None
    parent_version_id: int | None
    config: dict[str, Any]
    snapshot_max_vote_id: int
    snapshot_vote_count: int
    error: str | None
    attempts: int
    created_by: int | None
    created_at: UtcDatetime
    started_at: UtcDatetime | None
    finished_at: UtcDatetime | None


class RoundsPublic(BaseModel):
    data: list[RoundPublic]
    count: int


class RoundMetricPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    step: int
    loss: float | None
    implicit_acc: float | None
    reward_margin: float | None
    extra: dict[str, Any]


class RoundMetricsPublic(BaseModel):
    data: list[RoundMetricPublic]


class CreditCurvePublic(BaseModel):
    """A credit scheme over a base model's timesteps (``GET /rounds/credit``), for a plot."""

    scheme: str
    base_model: str = Field(description="The base model whose noise schedule was used.")
    num_train_timesteps: int = Field(description="T, the schedule's number of timesteps.")
    timesteps: list[float] = Field(
        description="Diffusers timesteps (0 = least noise, T - 1 = most): the middle of the run "
        "of timesteps each point averages over (every timestep when points >= T)."
    )
    weight: list[float] = Field(
        description="The credit W, normalised to mean 1 over all T timesteps, averaged over "
        "each point's run (uniform: all 1)."
    )
    density: list[float] = Field(
        description="The probability of drawing a timestep, W / sum W, averaged over each "
        "point's run (sums to 1 when points >= T)."
    )


# Leaderboard, stats, import ------------------------------------------------------------------


class LeaderboardEntry(BaseModel):
    version_id: int
    name: str
    status: str
    candidate: bool = Field(False, description="A candidate: not serving, under A/B.")
    score: float
    ci_low: float
    ci_high: float
    battles: int
    wins: int
    losses: int
    ties: int
    win_rate: float


class WinRateEntry(BaseModel):
    version_id: int
    opponent_id: int
    win_rate: float = Field(description="Share of their battles version_id won (ties half).")
    battles: int


class LeaderboardPublic(BaseModel):
    data: list[LeaderboardEntry]
    win_rates: list[WinRateEntry] = Field(
        default_factory=list,
        description="Head-to-head win rates for every ordered pair of versions that met.",
    )


class MyStats(BaseModel):
    votes: int
    votes_today: int


class StatsPublic(BaseModel):
    me: MyStats
    totals: dict[str, Any] | None = Field(None, description="Admins only.")


class ImportResultPublic(BaseModel):
    pairs: int
    votes: int
    prompts_created: int
    annotators_created: int
    versions_created: int
    rows: int = Field(0, description="Rows of the file read, labelled or not.")
    rows_unlabelled: int = Field(0, description="Rows read whose has_label is false (skipped).")
    row_groups: int = Field(0, description="Row groups in the file.")


class Health(BaseModel):
    status: str
    database: str
