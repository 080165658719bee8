"""Tastes: what a simulated annotator likes, beyond the prompt.

A *taste* is a small function ``(image, prompt) -> float`` (``image`` an ``[H, W, 3]`` uint8 RGB
array): a higher score is "more to my taste". Register one with :func:`taste`; adding a taste is
one small function::

    @taste("contrast", description="more contrast", scale=0.05)
    def contrast(image: np.ndarray, prompt: str) -> float:
        return float(np.asarray(image, dtype=np.float64).std() / 255.0)

Built in (all read from pixels; only ``fidelity`` reads the prompt):

=============  =====================================================  ==========
taste          direction                                              range
=============  =====================================================  ==========
``fidelity``   the judge's score: the image shows its prompt          [0, 1]
``brightness`` brighter images                                        [0, 1]
``size``       larger shapes (foreground area fraction)               [0, 1]
``centred``    shapes nearer the centre                               [0, 1]
``warmth``     a warmer palette (more red than blue)                  [0, 1]
=============  =====================================================  ==========

A :class:`TasteMix` weighs tastes into one *utility*: ``sum_i w_i * score_i / SCALES[i]``. Each
score is divided by its taste's typical spread (:data:`SCALES`) so that weights are comparable:
at ``fidelity:1,brightness:1`` a typical difference in brightness between the two images of a
pair counts as much as a typical difference in fidelity. :meth:`TasteMix.prefer` turns two
utilities into a vote, with ties and label noise. A mix is written as a string,
``"fidelity:1,brightness:0.5"`` (a bare name has weight 1), which :meth:`TasteMix.parse` reads
and ``str(mix)`` writes back.

Everything here is numpy only (no torch, no web or database), so the annotator, the demo and the
benchmarks can all use it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from types import MappingProxyType
from typing import Any

import numpy as np

from worker.shapes import judge as judge_mod
from worker.shapes import world
from worker.shapes.judge import Choice

TasteFn = Callable[[np.ndarray, str], float]

#: Typical spread of each built-in taste's score: the pooled *within-prompt* standard deviation
#: (the spread between two images of one prompt, which is what a vote compares), measured with
#: :func:`spreads` on 300 within-version pairs (600 images) of the shipped ``builtin:shapes``
#: model, drawn as ``worker.pair_pool`` draws them: a random world prompt, two random seeds and
#: two guidance scales from its grid (0.7 to 1.3 x the default 1.0), 25 DDIM steps. Measured
#: values: fidelity 0.108, brightness 0.0139, size 0.0062, centred 0.036, warmth 0.0156 (rounded
#: below). The spreads across images, prompt included, are much larger for the palette tastes
#: (brightness 0.22, warmth 0.24, centred 0.14, size 0.033, fidelity 0.127), because the colours
#: a prompt names dominate them; a vote never compares two prompts, so they are not the unit.
SCALES: dict[str, float] = {
    "fidelity": 0.11,
    "brightness": 0.014,
    "size": 0.0062,
    "centred": 0.036,
    "warmth": 0.016,
}

#: A judge-score difference at or below this is a tie (the judge's own ``prefer`` default).
JUDGE_TIE_MARGIN = 0.005
#: Default tie margin, in utility units: a judge-score difference of ``JUDGE_TIE_MARGIN`` at
#: fidelity weight 1, so that the mix ``"fidelity"`` votes as ``judge.prefer`` does.
DEFAULT_TIE_MARGIN = JUDGE_TIE_MARGIN / SCALES["fidelity"]

#: The demo's annotators: fidelity and a liking for brighter images, at equal weight. On the
#: within-version pairs of :data:`SCALES` (noise 0), brightness decides against fidelity in
#: 64 of 294 decisive votes (22%): visible in the votes, while fidelity decides the other 78%.
#: Weight 1 on any other taste does much the same (warmth 20%, centred 22%, size 23%), which is
#: what the scales are for; brightness alone disagrees with fidelity on 47% of the pairs.
DEMO_MIX = "fidelity:1,brightness:1"
#: Today's annotator: the judge alone.
FIDELITY_ONLY = "fidelity"


# ---------------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class Taste:
    """One registered taste: its function, what it likes (``description``) and its ``scale``
    (typical within-prompt spread of its score, the unit of its weight)."""

    name: str
    fn: TasteFn = field(repr=False)
    description: str
    scale: float

    def __call__(self, image: np.ndarray, prompt: str) -> float:
        return float(self.fn(image, prompt))


_REGISTRY: dict[str, Taste] = {}


def taste(
    name: str, *, description: str, scale: float | None = None
) -> Callable[[TasteFn], TasteFn]:
    """Register the decorated ``(image, prompt) -> float`` function as the taste ``name``.

    ``scale`` is the typical spread of its score between two images of one prompt (default:
    ``SCALES[name]``, else 1.0). Registering a name twice raises ``ValueError`` (call
    :func:`unregister_taste` first to replace one).
    """
    if not name or not name.replace("_", "").isalnum():
        raise ValueError(f"a taste name is letters, digits and '_', got {name!r}")
    s = SCALES.get(name, 1.0) if scale is None else float(scale)
    if not (math.isfinite(s) and s > 0):
        raise ValueError(f"the scale of taste {name!r} must be finite and positive, got {s}")

    def register(fn: TasteFn) -> TasteFn:
        if name in _REGISTRY:
            raise ValueError(f"taste {name!r} is already registered")
        _REGISTRY[name] = Taste(name, fn, description, s)
        return fn

    return register


def unregister_taste(name: str) -> None:
    """Remove a registered taste (``KeyError`` if there is none)."""
    del _REGISTRY[name]


def get_taste(name: str) -> Taste:
    """The taste ``name``; ``ValueError`` naming the known ones if there is none."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown taste {name!r}; known tastes: {', '.join(_REGISTRY)}") from None


def available_tastes() -> dict[str, str]:
    """``{name: description}`` of every registered taste, in registration order."""
    return {t.name: t.description for t in _REGISTRY.values()}


# ---------------------------------------------------------------------------- built-ins
def _pixels(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an [H, W, 3] RGB image, got shape {img.shape}")
    return img.astype(np.float64)


@lru_cache(maxsize=8)
def _measure_bytes(data: bytes, shape: tuple[int, ...], dtype: str) -> dict[str, object]:
    return judge_mod.measure(np.frombuffer(data, dtype=dtype).reshape(shape))


def reading(image: np.ndarray) -> dict[str, object]:
    """:func:`worker.shapes.judge.measure` of ``image``, cached by content (several tastes read
    one image; do not mutate the result)."""
    img = np.ascontiguousarray(image)
    return _measure_bytes(img.tobytes(), img.shape, img.dtype.str)


@taste("fidelity", description="the image shows its prompt (the judge's score)")
def fidelity(image: np.ndarray, prompt: str) -> float:
    """The judge's score of ``image`` against ``prompt`` (a world prompt): higher is more
    faithful. Range [0, 1]."""
    scene = world.parse_prompt(prompt)
    return judge_mod.score_measurements(reading(image), scene).score


@taste("brightness", description="brighter images")
def brightness(image: np.ndarray, prompt: str) -> float:
    """Mean pixel value over all pixels and channels / 255: higher is brighter. Range [0, 1]."""
    return float(_pixels(image).mean() / 255.0)


@taste("size", description="larger shapes")
def size(image: np.ndarray, prompt: str) -> float:
    """The shape's area as a fraction of the image (the judge's soft coverage): higher is
    larger; 0 when no shape is visible. Range [0, 1]; the world's sizes are 0.028 and 0.096.

    Left unscaled, so that it stays a readable area fraction; :data:`SCALES` makes its weight
    comparable with the others'."""
    m = reading(image)
    return float(m["area"]) if m["visible"] else 0.0  # type: ignore[arg-type]


#: Largest distance of a point of the unit square from its centre.
MAX_CENTRE_DISTANCE = math.sqrt(0.5)


@taste("centred", description="shapes nearer the centre")
def centred(image: np.ndarray, prompt: str) -> float:
    """``1 - d / sqrt(0.5)``, ``d`` the distance of the shape's centroid from the image centre
    in fractions of the side: higher is nearer the centre (1 at the centre, 0 at a corner, about
    0.6 at the world's corner positions); 0 when no shape is visible. Range [0, 1]."""
    m = reading(image)
    if not m["visible"]:
        return 0.0
    cx, cy = (float(v) for v in m["centroid"])  # type: ignore[attr-defined]
    return 1.0 - math.hypot(cx - 0.5, cy - 0.5) / MAX_CENTRE_DISTANCE


@taste("warmth", description="a warmer palette (more red than blue)")
def warmth(image: np.ndarray, prompt: str) -> float:
    """``(1 + x) / 2`` with ``x`` the mean of ``(R - B) / 255`` over the image: higher is warmer
    (1 for pure red, 0 for pure blue, 0.5 for greys). Range [0, 1]."""
    img = _pixels(image)
    x = float((img[..., 0] - img[..., 2]).mean() / 255.0)
    return (1.0 + x) / 2.0


# ---------------------------------------------------------------------------- mixes
def _check_probability(what: str, value: float) -> float:
    v = float(value)
    if not (math.isfinite(v) and 0.0 <= v <= 1.0):
        raise ValueError(f"{what} must be in [0, 1], got {value}")
    return v


def _format_number(x: float) -> str:
    short = f"{x:g}"
    return short if float(short) == x else repr(x)


@dataclass(frozen=True)
class TasteMix:
    """A simulated annotator's preference: a weighted mix of tastes, with label noise.

    Attributes:
        weights: ``{taste name: weight}``; known names, finite, non-negative, not all zero.
        noise: probability of flipping a decisive vote, in [0, 1].
        tie_margin: a utility difference at or below this is a tie (utility units; default
            :data:`DEFAULT_TIE_MARGIN`, the judge's own tie margin at fidelity weight 1).

    ``utility(image, prompt) = sum_i weights[i] * score_i(image, prompt) / scale_i``.
    """

    weights: Mapping[str, float]
    noise: float = 0.0
    tie_margin: float = DEFAULT_TIE_MARGIN

    def __post_init__(self) -> None:
        if not isinstance(self.weights, Mapping) or not self.weights:
            raise ValueError("a taste mix needs at least one taste weight")
        clean: dict[str, float] = {}
        for name, w in self.weights.items():
            get_taste(name)  # raises, naming the known tastes
            try:
                wf = float(w)
            except (TypeError, ValueError):
                raise ValueError(f"the weight of taste {name!r} is not a number: {w!r}") from None
            if not math.isfinite(wf):
                raise ValueError(f"the weight of taste {name!r} must be finite, got {w!r}")
            if wf < 0:
                raise ValueError(f"the weight of taste {name!r} must not be negative, got {w!r}")
            clean[name] = wf
        if not any(clean.values()):
            raise ValueError(f"the weights of a taste mix cannot all be zero: {self.weights!r}")
        object.__setattr__(self, "weights", MappingProxyType(clean))
        object.__setattr__(self, "noise", _check_probability("noise", self.noise))
        margin = float(self.tie_margin)
        if not (math.isfinite(margin) and margin >= 0):
            raise ValueError(f"tie_margin must be finite and non-negative, got {self.tie_margin}")
        object.__setattr__(self, "tie_margin", margin)

    def __hash__(self) -> int:
        return hash((tuple(self.weights.items()), self.noise, self.tie_margin))

    # ------------------------------------------------------------------ text form
    @classmethod
    def parse(
        cls, spec: str, *, noise: float = 0.0, tie_margin: float = DEFAULT_TIE_MARGIN
    ) -> TasteMix:
        """Read ``"fidelity:0.5,brightness:0.5"`` (or ``"brightness"``: weight 1).

        Whitespace around names and weights is forgiven; an empty part, a repeated or unknown
        name, or a bad weight raises ``ValueError`` naming it.
        """
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError(
                f"empty taste mix {spec!r}; expected e.g. 'fidelity:1,brightness:0.5' "
                f"(tastes: {', '.join(_REGISTRY)})"
            )
        weights: dict[str, float] = {}
        for part in spec.split(","):
            item = part.strip()
            if not item:
                raise ValueError(f"empty part in taste mix {spec!r}")
            name, sep, raw = item.partition(":")
            name = name.strip()
            if name in weights:
                raise ValueError(f"taste {name!r} appears twice in taste mix {spec!r}")
            get_taste(name)
            if sep:
                try:
                    weights[name] = float(raw.strip())
                except ValueError:
                    raise ValueError(
                        f"the weight of taste {name!r} is not a number: {raw.strip()!r}"
                    ) from None
            else:
                weights[name] = 1.0
        return cls(weights, noise=noise, tie_margin=tie_margin)

    def __str__(self) -> str:
        return ",".join(f"{n}:{_format_number(w)}" for n, w in self.weights.items())

    def describe(self) -> str:
        """One line for people: the mix, its label noise and what each taste likes."""
        likes = "; ".join(f"{n}: {_REGISTRY[n].description}" for n in self.weights)
        return f"{self} (label noise {_format_number(self.noise)}; {likes})"

    # ------------------------------------------------------------------ scoring
    def scores(self, image: np.ndarray, prompt: str) -> dict[str, float]:
        """Each taste's raw score of ``image`` (weight-0 tastes included)."""
        return {n: _REGISTRY[n](image, prompt) for n in self.weights}

    def utility(self, image: np.ndarray, prompt: str) -> float:
        """``sum_i w_i * score_i / scale_i``; tastes of weight 0 are not computed."""
        total = 0.0
        for name, w in self.weights.items():
            if w:
                t = _REGISTRY[name]
                total += w * t(image, prompt) / t.scale
        return float(total)

    def utilities(
        self, images: Sequence[np.ndarray] | np.ndarray, prompts: Sequence[str]
    ) -> np.ndarray:
        """``[N]`` float64 utilities of ``images[i]`` for ``prompts[i]``."""
        if isinstance(prompts, str):
            raise ValueError("prompts must be a sequence of prompts, one per image")
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        return np.array(
            [self.utility(img, p) for img, p in zip(images, prompts, strict=True)],
            dtype=np.float64,
        )

    def prefer(
        self,
        image_a: np.ndarray,
        image_b: np.ndarray,
        prompt: str,
        rng: np.random.Generator | None = None,
    ) -> Choice:
        """The vote between two images of one prompt: ``"a"``, ``"b"`` or ``"tie"``.

        The higher utility wins; utilities within ``tie_margin`` are a tie. A decisive vote is
        flipped with probability ``noise``; ties never are. When ``rng`` is given it is drawn
        once per decisive vote, whatever the noise (so runs at different noise levels share
        their random numbers); it is required when ``noise > 0``.
        """
        if self.noise > 0.0 and rng is None:
            raise ValueError("prefer() with noise > 0 needs an rng")
        ua = self.utility(image_a, prompt)
        ub = self.utility(image_b, prompt)
        if abs(ua - ub) <= self.tie_margin:
            return "tie"
        choice: Choice = "a" if ua > ub else "b"
        if rng is not None and rng.random() < self.noise:
            choice = "b" if choice == "a" else "a"
        return choice


def parse_mix(spec: str | TasteMix, *, noise: float = 0.0) -> TasteMix:
    """``spec`` as a :class:`TasteMix` (a mix is returned as it is)."""
    return spec if isinstance(spec, TasteMix) else TasteMix.parse(spec, noise=noise)


# ---------------------------------------------------------------------------- measuring
def spreads(
    images: Sequence[np.ndarray] | np.ndarray,
    prompts: Sequence[str],
    names: Sequence[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """How much each taste's score varies: the input to :data:`SCALES`.

    For each taste (default: all), ``{"within": pooled within-prompt standard deviation (over
    prompts with at least two images), "overall": standard deviation over all images, "mean":
    mean score}``. Give several images per prompt (e.g. the two images of within-version pairs)
    for ``within``.
    """
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    out: dict[str, dict[str, Any]] = {}
    for name in names if names is not None else list(_REGISTRY):
        t = get_taste(name)
        s = np.array([t(img, p) for img, p in zip(images, prompts, strict=True)])
        ss, dof = 0.0, 0
        for idx in groups.values():
            if len(idx) > 1:
                g = s[idx]
                ss += float(((g - g.mean()) ** 2).sum())
                dof += len(idx) - 1
        out[name] = {
            "within": math.sqrt(ss / dof) if dof else float("nan"),
            "overall": float(s.std(ddof=1)) if len(s) > 1 else float("nan"),
            "mean": float(s.mean()) if len(s) else float("nan"),
        }
    return out
