"""Credit schemes over diffusion timesteps: how much each step k counts in the preference loss.

The method and its derivation are in ``docs/dde.md``. In short, for a noise schedule with T steps
and the two per-step coefficients

    a_k = 1 / (2 ᾱ_k)                                  (single-shot, via DDIM's x_0 prediction)
    b_k = β_k / (2 α_k (1 - ᾱ_{k-1})),  b_1 = 1 / (2 α_1)   (stepwise, DDPM posterior)

DDE with a switch step τ gives step k the credit

    W_τ(k) = a_k               for k < τ
             a_τ (T - τ + 1)   for k = τ
             (T - k + 1) b_k   for k > τ

and the ``dde`` scheme averages W_τ over the integer τ in a band [τ_c - h, τ_c + h].

Index conventions (the one thing to get right when wiring this to a scheduler):

- ``alphas_cumprod`` is the scheduler's array of length T; its entry ``i`` (0-based, the value a
  diffusers UNet receives as ``timestep``) is ᾱ_k for the 1-based step ``k = i + 1`` of
  ``docs/dde.md``. ᾱ_0 := 1 (no noise) is implied and never stored.
- Every array returned here has length T and is indexed the same way: entry ``i`` is the credit of
  step ``k = i + 1``, i.e. of diffusers timestep ``i``. :class:`TimestepSampler` returns diffusers
  indices ``i`` directly, ready for ``scheduler.add_noise`` and the UNet.
- Switch steps τ and the band [τ_c - h, τ_c + h] are in the 1-based k notation; τ = 0 means
  "stepwise everywhere" and τ = T "single-shot everywhere".
- :func:`describe` reports quantiles as 1-based steps k, to match the figures in the docs.

A scheme is one small function registered by name::

    @register_scheme("my-scheme")
    def my_scheme(alphas_cumprod: np.ndarray, params: CreditParams) -> np.ndarray:
        return ...  # raw W >= 0, length T, float64

:func:`credit_weights` validates and normalises any scheme's output to mean 1 over k, so that β
keeps its Diffusion-DPO meaning.

Only numpy is imported at module level: the API imports this module for the credit plot of
``GET /api/v1/rounds/credit`` and has no torch (``tests/deploy/test_packaging.py``). The
``*_array`` functions are numpy throughout; :func:`credit_weights`, :func:`credit_distribution`
and :class:`TimestepSampler` import torch when called.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeGuard

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = [
    "CreditParams",
    "CreditScheme",
    "CreditSummary",
    "SAMPLING_MODES",
    "SamplingMode",
    "TimestepSampler",
    "UnknownCreditSchemeError",
    "available_schemes",
    "credit_distribution",
    "credit_distribution_array",
    "credit_weights",
    "credit_weights_array",
    "describe",
    "get_scheme",
    "register_scheme",
    "single_shot_coefficients",
    "stepwise_coefficients",
    "switch_band",
    "switch_credit",
]

DEFAULT_TAU_CENTER_FRACTION = 0.5
"""Default switch-band centre τ_c, as a fraction of T (docs/dde.md: τ_c = T/2)."""

DEFAULT_TAU_HALFWIDTH_FRACTION = 0.1
"""Default switch-band half-width h, as a fraction of T (docs/dde.md: h = T/10)."""

_BAND_EPS = 1e-9  # so that a band edge like 400.0000000001 still includes τ = 400

SamplingMode = Literal["importance", "weighted", "importance-corrected"]
#: The timestep modes (:class:`TimestepSampler`).
SAMPLING_MODES: tuple[str, ...] = ("importance", "weighted", "importance-corrected")
if TYPE_CHECKING:
    ScheduleLike = np.ndarray | torch.Tensor | Sequence[float]
else:
    ScheduleLike = Any


def _is_tensor(value: object) -> TypeGuard[torch.Tensor]:
    """Whether ``value`` is a torch tensor, without importing torch (when torch was never
    imported, nothing can be a tensor)."""
    torch_module = sys.modules.get("torch")
    return torch_module is not None and isinstance(value, torch_module.Tensor)


# --------------------------------------------------------------------------------------------
# Parameters and the registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CreditParams:
    """Settings of the schemes that have any (today only ``dde``'s switch band).

    Attributes:
        tau_center: centre τ_c of the switch band, as a 1-based step in [0, T]. ``None`` means
            ``DEFAULT_TAU_CENTER_FRACTION * T`` (T/2).
        tau_halfwidth: half-width h >= 0 of the band. ``None`` means
            ``DEFAULT_TAU_HALFWIDTH_FRACTION * T`` (T/10). ``0`` gives a single switch step.
    """

    tau_center: float | None = None
    tau_halfwidth: float | None = None

    def __post_init__(self) -> None:
        if self.tau_center is not None and not math.isfinite(self.tau_center):
            raise ValueError(f"tau_center must be finite, got {self.tau_center!r}")
        if self.tau_halfwidth is not None and not (
            math.isfinite(self.tau_halfwidth) and self.tau_halfwidth >= 0
        ):
            raise ValueError(f"tau_halfwidth must be finite and >= 0, got {self.tau_halfwidth!r}")

    def resolve(self, num_timesteps: int) -> tuple[float, float]:
        """Returns ``(tau_center, tau_halfwidth)`` for a schedule of T steps, defaults filled in."""
        center = (
            DEFAULT_TAU_CENTER_FRACTION * num_timesteps
            if self.tau_center is None
            else float(self.tau_center)
        )
        halfwidth = (
            DEFAULT_TAU_HALFWIDTH_FRACTION * num_timesteps
            if self.tau_halfwidth is None
            else float(self.tau_halfwidth)
        )
        return center, halfwidth


class CreditScheme(Protocol):
    """A credit scheme: the schedule's ᾱ (float64, length T) -> raw credit W >= 0 (length T)."""

    def __call__(self, alphas_cumprod: np.ndarray, params: CreditParams) -> np.ndarray: ...


class UnknownCreditSchemeError(ValueError):
    """Raised by :func:`get_scheme` for a name that is not registered."""


_REGISTRY: dict[str, CreditScheme] = {}


def register_scheme(name: str) -> Callable[[CreditScheme], CreditScheme]:
    """Decorator registering a credit scheme under ``name``; a name can be registered once."""
    if not name or name != name.strip():
        raise ValueError(f"scheme name must be a non-empty string without edge spaces: {name!r}")

    def decorator(fn: CreditScheme) -> CreditScheme:
        if name in _REGISTRY:
            raise ValueError(f"credit scheme {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return decorator


def get_scheme(name: str) -> CreditScheme:
    """The scheme registered under ``name``; :class:`UnknownCreditSchemeError` lists the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(available_schemes())
        raise UnknownCreditSchemeError(
            f"unknown credit scheme {name!r}; known schemes: {known}"
        ) from None


def available_schemes() -> list[str]:
    """Names of the registered schemes, sorted."""
    return sorted(_REGISTRY)


# --------------------------------------------------------------------------------------------
# Schedule maths
# --------------------------------------------------------------------------------------------


def _as_schedule(alphas_cumprod: ScheduleLike) -> np.ndarray:
    """Validates ᾱ and returns it as a float64 numpy array of length T.

    Requires a 1-D, finite, non-increasing array with 0 < ᾱ_k < 1: ᾱ_T = 0 (zero terminal SNR)
    makes a_T infinite, and ᾱ_1 = 1 makes b_2 divide by zero.
    """
    if _is_tensor(alphas_cumprod):
        arr = alphas_cumprod.detach().cpu().double().numpy()
    else:
        arr = np.asarray(alphas_cumprod, dtype=np.float64)
    if arr.ndim != 1 or arr.shape[0] < 1:
        raise ValueError(f"alphas_cumprod must be a non-empty 1-D array, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("alphas_cumprod must be finite")
    if not np.all((arr > 0) & (arr < 1)):
        raise ValueError(
            "alphas_cumprod must lie strictly in (0, 1); a zero-terminal-SNR schedule "
            f"(ᾱ_T = 0) has no finite credit. Got min {arr.min()!r}, max {arr.max()!r}"
        )
    if np.any(np.diff(arr) > 0):
        raise ValueError("alphas_cumprod must be non-increasing in the timestep")
    return arr


def single_shot_coefficients(alphas_cumprod: ScheduleLike) -> np.ndarray:
    """a_k = 1 / (2 ᾱ_k) for k = 1..T, as a float64 array of length T (entry i is step i + 1)."""
    abar = _as_schedule(alphas_cumprod)
    return 0.5 / abar


def stepwise_coefficients(alphas_cumprod: ScheduleLike) -> np.ndarray:
    """b_k = β_k / (2 α_k (1 - ᾱ_{k-1})) for k = 2..T and b_1 = 1 / (2 α_1); float64, length T.

    α_k = ᾱ_k / ᾱ_{k-1} and β_k = 1 - α_k are recovered from ᾱ, with ᾱ_0 := 1.
    """
    abar = _as_schedule(alphas_cumprod)
    abar_prev = np.concatenate(([1.0], abar[:-1]))
    alpha = abar / abar_prev
    beta = 1.0 - alpha
    b = np.empty_like(abar)
    b[0] = 0.5 / alpha[0]
    b[1:] = beta[1:] / (2.0 * alpha[1:] * (1.0 - abar_prev[1:]))
    return b


def switch_band(num_timesteps: int, params: CreditParams | None = None) -> tuple[int, int]:
    """The integer switch steps of the band: ``(lo, hi)`` with τ in ``lo..hi`` inclusive.

    The band is every integer τ with τ_c - h <= τ <= τ_c + h, clipped to [0, T]. Raises
    ``ValueError`` if no integer τ is left.
    """
    center, halfwidth = (params or CreditParams()).resolve(num_timesteps)
    lo = max(0, math.ceil(center - halfwidth - _BAND_EPS))
    hi = min(num_timesteps, math.floor(center + halfwidth + _BAND_EPS))
    if lo > hi:
        raise ValueError(
            f"switch band [{center - halfwidth}, {center + halfwidth}] contains no integer step "
            f"in [0, {num_timesteps}]"
        )
    return lo, hi


def switch_credit(alphas_cumprod: ScheduleLike, tau: int) -> np.ndarray:
    """W_τ(k) for one switch step τ in [0, T] (docs/dde.md), raw, float64, length T."""
    abar = _as_schedule(alphas_cumprod)
    num_timesteps = abar.shape[0]
    if not 0 <= tau <= num_timesteps:
        raise ValueError(f"tau must lie in [0, {num_timesteps}], got {tau}")
    return _band_credit(abar, tau, tau)


def _band_credit(abar: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Mean of W_τ over the integers τ = lo..hi, in O(T).

    For step k, n_gt(k) band members have τ > k (credit a_k each), at most one has τ = k
    (a_k (T - k + 1)) and n_lt(k) have τ < k ((T - k + 1) b_k each). The counts come from a
    cumulative sum of the band's indicator over τ = 0..T.
    """
    num_timesteps = abar.shape[0]
    a = 0.5 / abar
    b = stepwise_coefficients(abar)
    k = np.arange(1, num_timesteps + 1, dtype=np.float64)
    remaining = num_timesteps - k + 1.0  # perspectives t >= k

    member = np.zeros(num_timesteps + 1, dtype=np.float64)  # indexed by τ = 0..T
    member[lo : hi + 1] = 1.0
    cum = np.cumsum(member)  # cum[j] = #{τ in band : τ <= j}
    n_band = cum[-1]
    n_lt = cum[:-1]  # τ <= k - 1, for k = 1..T
    n_eq = member[1:]
    n_gt = n_band - cum[1:]
    return (n_gt * a + n_eq * a * remaining + n_lt * remaining * b) / n_band


# --------------------------------------------------------------------------------------------
# The schemes
# --------------------------------------------------------------------------------------------


@register_scheme("uniform")
def uniform_scheme(alphas_cumprod: np.ndarray, params: CreditParams) -> np.ndarray:
    """W(k) = 1: Diffusion-DPO (Wallace et al. 2023)."""
    return np.ones_like(alphas_cumprod, dtype=np.float64)


@register_scheme("dde")
def dde_scheme(alphas_cumprod: np.ndarray, params: CreditParams) -> np.ndarray:
    """W(k) = mean of W_τ(k) over the switch band (docs/dde.md): the default."""
    lo, hi = switch_band(alphas_cumprod.shape[0], params)
    return _band_credit(alphas_cumprod, lo, hi)


@register_scheme("dde-stepwise")
def dde_stepwise_scheme(alphas_cumprod: np.ndarray, params: CreditParams) -> np.ndarray:
    """W(k) = (T - k + 1) b_k: the stepwise estimator everywhere (τ = 0), an ablation."""
    num_timesteps = alphas_cumprod.shape[0]
    remaining = np.arange(num_timesteps, 0, -1, dtype=np.float64)
    return remaining * stepwise_coefficients(alphas_cumprod)


@register_scheme("dde-single-shot")
def dde_single_shot_scheme(alphas_cumprod: np.ndarray, params: CreditParams) -> np.ndarray:
    """W(k) = a_k = 1 / (2 ᾱ_k): the single-shot estimator everywhere (τ = T), an ablation."""
    return single_shot_coefficients(alphas_cumprod)


# --------------------------------------------------------------------------------------------
# Normalised credit
# --------------------------------------------------------------------------------------------


def _raw_credit(
    scheme: str | CreditScheme, alphas_cumprod: ScheduleLike, params: CreditParams | None
) -> np.ndarray:
    abar = _as_schedule(alphas_cumprod)
    fn = get_scheme(scheme) if isinstance(scheme, str) else scheme
    raw = np.asarray(fn(abar, params or CreditParams()), dtype=np.float64)
    name = scheme if isinstance(scheme, str) else getattr(scheme, "__name__", repr(scheme))
    if raw.shape != abar.shape:
        raise ValueError(f"scheme {name!r} returned shape {raw.shape}, expected {abar.shape}")
    if not np.all(np.isfinite(raw)) or np.any(raw < 0):
        raise ValueError(f"scheme {name!r} returned credit that is negative or not finite")
    if raw.sum() <= 0:
        raise ValueError(f"scheme {name!r} returned all-zero credit")
    return raw


def credit_weights_array(
    scheme: str | CreditScheme,
    alphas_cumprod: ScheduleLike,
    params: CreditParams | None = None,
) -> np.ndarray:
    """The scheme's credit, normalised to mean 1 over k.

    Args:
        scheme: a registered name (see :func:`available_schemes`) or a scheme function.
        alphas_cumprod: ``[T]`` the scheduler's ᾱ, entry i = diffusers timestep i.
        params: scheme settings; ``None`` means the defaults.

    Returns:
        ``[T]`` float64 array W with W >= 0 and W.mean() == 1; entry i is the weight of
        diffusers timestep i.
    """
    raw = _raw_credit(scheme, alphas_cumprod, params)
    return raw * (raw.shape[0] / raw.sum())


def credit_distribution_array(
    scheme: str | CreditScheme,
    alphas_cumprod: ScheduleLike,
    params: CreditParams | None = None,
) -> np.ndarray:
    """p(k) = W(k) / Σ W: ``[T]`` float64 array summing to 1, entry i = diffusers timestep i."""
    raw = _raw_credit(scheme, alphas_cumprod, params)
    return raw / raw.sum()


def credit_weights(
    scheme: str | CreditScheme,
    alphas_cumprod: ScheduleLike,
    params: CreditParams | None = None,
) -> torch.Tensor:
    """:func:`credit_weights_array` as a ``[T]`` float64 CPU tensor (mean 1)."""
    import torch

    return torch.from_numpy(credit_weights_array(scheme, alphas_cumprod, params))


def credit_distribution(
    scheme: str | CreditScheme,
    alphas_cumprod: ScheduleLike,
    params: CreditParams | None = None,
) -> torch.Tensor:
    """:func:`credit_distribution_array` as a ``[T]`` float64 CPU tensor (summing to 1)."""
    import torch

    return torch.from_numpy(credit_distribution_array(scheme, alphas_cumprod, params))


@dataclass(frozen=True)
class CreditSummary:
    """Where a distribution over steps puts its mass; every step is 1-based (k = index + 1).

    Attributes:
        num_timesteps: T.
        p05, q25, median, q75, p95: the smallest k whose cumulative mass reaches 5/25/50/75/95 %.
        peak: the k with the largest mass (the smallest such k on ties).
        peak_mass: p(peak).
        mass_below_tenth: the mass on steps k <= T/10 (the low-noise tenth of the trajectory).
    """

    num_timesteps: int
    p05: int
    q25: int
    median: int
    q75: int
    p95: int
    peak: int
    peak_mass: float
    mass_below_tenth: float

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def describe(dist: torch.Tensor | np.ndarray | Sequence[float]) -> CreditSummary:
    """Quantiles of a distribution (or of unnormalised non-negative weights) over steps 1..T."""
    p = np.asarray(dist.detach().cpu().numpy() if _is_tensor(dist) else dist, dtype=np.float64)
    if p.ndim != 1 or p.shape[0] < 1 or np.any(p < 0) or not np.all(np.isfinite(p)):
        raise ValueError("dist must be a non-empty 1-D array of finite non-negative values")
    total = p.sum()
    if total <= 0:
        raise ValueError("dist has no mass")
    p = p / total
    cdf = np.cumsum(p)
    num_timesteps = p.shape[0]

    def quantile(q: float) -> int:
        # smallest 1-based k with cdf >= q; the tolerance absorbs rounding in the cumulative sum
        return int(min(np.searchsorted(cdf, q - 1e-12, side="left"), num_timesteps - 1)) + 1

    peak_index = int(np.argmax(p))
    return CreditSummary(
        num_timesteps=num_timesteps,
        p05=quantile(0.05),
        q25=quantile(0.25),
        median=quantile(0.50),
        q75=quantile(0.75),
        p95=quantile(0.95),
        peak=peak_index + 1,
        peak_mass=float(p[peak_index]),
        mass_below_tenth=float(p[: num_timesteps // 10].sum()),
    )


# --------------------------------------------------------------------------------------------
# Sampling timesteps for the loss
# --------------------------------------------------------------------------------------------


class TimestepSampler:
    """Draws the timestep (and its loss weight) of each preference pair from a credit scheme.

    - ``"importance"`` (the default in docs/dde.md): timestep i with probability p(i) = W(i) / T,
      weight 1. One UNet evaluation per image and per network, Diffusion-DPO's cost.
    - ``"weighted"``: timestep i uniform on 0..T-1, weight W(i) (mean-1 normalised), applied
      *inside* the log-sigmoid (docs/dde.md: ``-log σ(-(β/2) w (D^w - D^l))``).
    - ``"importance-corrected"``: timestep i with probability p(i) (as ``"importance"``), weight
      W(i) inside the log-sigmoid, and the pair's loss scaled by 1 / W(i) outside it. Its
      expected loss is exactly ``"weighted"``'s, ``E_p[(1/W) f(W Δ)] = (1/T) Σ_k f(W_k Δ_k)``,
      with importance sampling's timesteps.

    ``"importance"`` and ``"weighted"`` are *not* the same objective once the policy moves:
    importance keeps one β and only changes where timesteps fall (its expected loss is
    ``(1/T) Σ_k W_k f(Δ_k)``, W outside), while weighted scales β by W(k) (W inside). Their
    gradients agree only at the reference, where f is linear in Δ to first order.

    Attributes:
        scheme: the scheme's name (or the function's ``__name__``).
        mode: ``"importance"`` or ``"weighted"``.
        num_timesteps: T.
        weights: ``[T]`` float64, mean-1 credit W; entry i = diffusers timestep i.
        probs: ``[T]`` float64, W / Σ W.
    """

    def __init__(
        self,
        scheme: str | CreditScheme,
        alphas_cumprod: ScheduleLike,
        mode: SamplingMode = "importance",
        params: CreditParams | None = None,
    ) -> None:
        if mode not in SAMPLING_MODES:
            raise ValueError(f"mode must be one of {list(SAMPLING_MODES)}, got {mode!r}")
        self.scheme = scheme if isinstance(scheme, str) else getattr(scheme, "__name__", "custom")
        self.mode: SamplingMode = mode
        self.params = params or CreditParams()
        self.weights = credit_weights(scheme, alphas_cumprod, self.params)
        self.probs = self.weights / self.weights.sum()
        self.num_timesteps = int(self.weights.shape[0])

    def sample(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draws B timesteps and their loss weights.

        Args:
            batch_size: B >= 1, the number of preference pairs (both images of a pair share one
                timestep).
            generator: source of randomness; the draw happens on the generator's device.
            device: where the outputs go; default CPU.

        Returns:
            ``(timesteps, weights)``: ``[B]`` int64 diffusers indices in 0..T-1 and ``[B]``
            float32 credit weights W(k) of the drawn timesteps (all 1 in ``"importance"``
            mode; the trainer puts them inside the log-sigmoid, and for
            ``"importance-corrected"`` also divides the pair's loss by them).
        """
        import torch

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        draw_device = generator.device if generator is not None else torch.device("cpu")
        out_device = torch.device(device) if device is not None else torch.device("cpu")
        if self.mode in ("importance", "importance-corrected"):
            timesteps = torch.multinomial(
                self.probs.to(draw_device), batch_size, replacement=True, generator=generator
            )
            if self.mode == "importance":
                weights = torch.ones(batch_size, dtype=torch.float32)
            else:
                weights = self.weights[timesteps.cpu()].to(torch.float32)
        else:
            timesteps = torch.randint(
                0, self.num_timesteps, (batch_size,), generator=generator, device=draw_device
            )
            weights = self.weights[timesteps.cpu()].to(torch.float32)
        return timesteps.to(out_device, torch.long), weights.to(out_device)

    def histogram(self, timesteps: torch.Tensor, bins: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Counts of sampled diffusers indices in ``bins`` equal-width bins over [0, T).

        Returns:
            ``(counts, edges)`` as :func:`numpy.histogram` gives them: ``[bins]`` int64 and
            ``[bins + 1]`` float64 edges in diffusers-index units.
        """
        if bins < 1:
            raise ValueError(f"bins must be >= 1, got {bins}")
        values = timesteps.detach().cpu().numpy().reshape(-1)
        if values.size and (values.min() < 0 or values.max() >= self.num_timesteps):
            raise ValueError(f"timesteps must lie in [0, {self.num_timesteps})")
        counts, edges = np.histogram(values, bins=bins, range=(0, self.num_timesteps))
        return counts.astype(np.int64), edges
