"""Tastes and taste mixes: hand-computed values on tiny images, the registry, parsing, votes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from worker.shapes import judge, tastes, world
from worker.shapes.tastes import SCALES, TasteMix
from worker.shapes.world import Scene

PROMPT = "a large white square on a black background, center"


def _solid(rgb: tuple[int, int, int], size: int = 4) -> np.ndarray:
    return np.tile(np.array(rgb, dtype=np.uint8), (size, size, 1))


def _half_white() -> np.ndarray:
    img = np.zeros((4, 4, 3), dtype=np.uint8)
    img[:2] = 255  # the top two rows white, the rest black
    return img


def _square(top: int, left: int, side: int = 8, size: int = 32) -> np.ndarray:
    """A hard-edged white square on black: area and centroid are exact."""
    img = np.zeros((size, size, 3), dtype=np.uint8)
    img[top : top + side, left : left + side] = 255
    return img


# ---------------------------------------------------------------------------- tastes
def test_brightness_by_hand() -> None:
    b = tastes.get_taste("brightness")
    assert b(_solid((255, 255, 255)), PROMPT) == 1.0
    assert b(_solid((0, 0, 0)), PROMPT) == 0.0
    assert b(_half_white(), PROMPT) == 0.5
    assert b(_solid((255, 0, 0)), PROMPT) == pytest.approx(1 / 3)  # channels are averaged too
    assert b(_solid((51, 102, 153)), PROMPT) == pytest.approx(0.4)


def test_warmth_by_hand() -> None:
    w = tastes.get_taste("warmth")
    assert w(_solid((255, 0, 0)), PROMPT) == 1.0
    assert w(_solid((0, 0, 255)), PROMPT) == 0.0
    assert w(_solid((128, 128, 128)), PROMPT) == 0.5
    half = _solid((255, 0, 0))
    half[2:] = (0, 0, 255)
    assert w(half, PROMPT) == 0.5
    assert w(_solid((102, 7, 51)), PROMPT) == pytest.approx(0.6)  # (102 - 51) / 255 = 0.2


def test_size_and_centred_on_a_synthetic_square() -> None:
    size, centred = tastes.get_taste("size"), tastes.get_taste("centred")
    middle = _square(12, 12)  # centroid (16, 16) px = (0.5, 0.5)
    assert size(middle, PROMPT) == pytest.approx(64 / 1024)
    assert centred(middle, PROMPT) == pytest.approx(1.0)
    corner = _square(4, 4)  # centroid (8, 8) px = (0.25, 0.25): d = 0.25 * sqrt(2)
    assert size(corner, PROMPT) == pytest.approx(64 / 1024)
    assert centred(corner, PROMPT) == pytest.approx(0.5)
    side = _square(12, 4)  # centroid (0.25, 0.5): d = 0.25
    assert centred(side, PROMPT) == pytest.approx(1 - 0.25 / math.sqrt(0.5))


def test_size_and_centred_are_zero_without_a_shape() -> None:
    blank = _solid((40, 80, 220), size=32)
    assert tastes.get_taste("size")(blank, PROMPT) == 0.0
    assert tastes.get_taste("centred")(blank, PROMPT) == 0.0


@pytest.mark.parametrize(
    ("scene", "area", "centre_score"),
    [
        (Scene("square", "white", "large", "center", "black"), 0.096, 1.0),
        (Scene("circle", "red", "small", "top left", "yellow"), 0.028, 0.6),
        (Scene("triangle", "blue", "large", "bottom right", "white"), 0.096, 0.6),
    ],
)
def test_size_and_centred_on_rendered_scenes(scene: Scene, area: float, centre_score: float):
    img = world.render(scene)
    m = judge.measure(img)
    cx, cy = m["centroid"]
    assert tastes.get_taste("size")(img, scene.prompt) == pytest.approx(m["area"])
    assert tastes.get_taste("centred")(img, scene.prompt) == pytest.approx(
        1 - math.hypot(cx - 0.5, cy - 0.5) / math.sqrt(0.5)
    )
    # and close to the world's nominal geometry (corners at 0.3 / 0.7: 1 - 0.2 * 2 = 0.6)
    assert tastes.get_taste("size")(img, scene.prompt) == pytest.approx(area, rel=0.08)
    assert tastes.get_taste("centred")(img, scene.prompt) == pytest.approx(centre_score, abs=0.02)


def test_fidelity_is_the_judges_score() -> None:
    rng = np.random.default_rng(3)
    for scene in world.sample_scenes(5, rng):
        img = world.render(scene, rng=rng)
        wrong = world.render(Scene("circle", "green", "small", "top right", "purple"))
        f = tastes.get_taste("fidelity")
        assert f(img, scene.prompt) == judge.judge(img, scene.prompt).score
        assert f(wrong, scene.prompt) == judge.judge(wrong, scene.prompt).score
        assert 0.0 <= f(wrong, scene.prompt) < f(img, scene.prompt) <= 1.0


# ---------------------------------------------------------------------------- registry
def test_the_built_in_tastes_are_listed_with_descriptions() -> None:
    listed = tastes.available_tastes()
    assert list(listed)[:5] == ["fidelity", "brightness", "size", "centred", "warmth"]
    assert all(isinstance(d, str) and d for d in listed.values())
    for name in ("fidelity", "brightness", "size", "centred", "warmth"):
        t = tastes.get_taste(name)
        assert t.scale == SCALES[name] > 0
        assert t.fn.__doc__ and "Range" in t.fn.__doc__


def test_registering_a_taste_takes_a_few_lines() -> None:
    @tastes.taste("greenness", description="greener images", scale=0.5)
    def greenness(image: np.ndarray, prompt: str) -> float:
        return float(np.asarray(image)[..., 1].mean() / 255.0)

    try:
        assert tastes.available_tastes()["greenness"] == "greener images"
        mix = TasteMix.parse("greenness:2")
        assert mix.utility(_solid((0, 255, 0)), "anything") == pytest.approx(2 * 1.0 / 0.5)
        with pytest.raises(ValueError, match="already registered"):
            tastes.taste("greenness", description="again")(greenness)
    finally:
        tastes.unregister_taste("greenness")
    with pytest.raises(ValueError, match="unknown taste 'greenness'"):
        TasteMix.parse("greenness")


def test_an_unknown_taste_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown taste 'brighness'; known tastes: fidelity, "):
        TasteMix.parse("fidelity:1,brighness:1")
    with pytest.raises(ValueError, match="unknown taste 'x'"):
        TasteMix({"x": 1.0})
    with pytest.raises(ValueError, match="letters, digits"):
        tastes.taste("bad name", description="")


# ---------------------------------------------------------------------------- parsing
def test_parse_and_round_trip() -> None:
    assert dict(TasteMix.parse("brightness").weights) == {"brightness": 1.0}
    mix = TasteMix.parse(" fidelity : 0.5 , brightness:0.5 ", noise=0.1)
    assert dict(mix.weights) == {"fidelity": 0.5, "brightness": 0.5}
    assert mix.noise == 0.1
    assert str(mix) == "fidelity:0.5,brightness:0.5"
    for spec in ("fidelity:1,brightness:0.5", "warmth:0.1234567891,size:3", "centred:0,fidelity:2"):
        m = TasteMix.parse(spec, noise=0.25, tie_margin=0.2)
        assert str(m) == spec
        assert TasteMix.parse(str(m), noise=m.noise, tie_margin=m.tie_margin) == m
        assert hash(TasteMix.parse(str(m), noise=0.25, tie_margin=0.2)) == hash(m)
    assert str(TasteMix.parse(tastes.DEMO_MIX)) == tastes.DEMO_MIX
    assert "fidelity" in TasteMix.parse(tastes.DEMO_MIX).describe()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "empty taste mix"),
        ("   ", "empty taste mix"),
        ("fidelity,,brightness", "empty part"),
        ("fidelity:1,fidelity:2", "'fidelity' appears twice"),
        ("brightness:lots", "weight of taste 'brightness' is not a number: 'lots'"),
        ("brightness:-1", "weight of taste 'brightness' must not be negative"),
        ("brightness:nan", "weight of taste 'brightness' must be finite"),
        ("brightness:inf", "weight of taste 'brightness' must be finite"),
        ("fidelity:0,brightness:0", "cannot all be zero"),
        ("nope:1", "unknown taste 'nope'"),
    ],
)
def test_bad_specs_are_named(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TasteMix.parse(spec)


def test_bad_noise_and_tie_margin() -> None:
    for noise in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="noise must be in"):
            TasteMix.parse("fidelity", noise=noise)
    with pytest.raises(ValueError, match="tie_margin"):
        TasteMix.parse("fidelity", tie_margin=-1)
    with pytest.raises(ValueError, match="at least one"):
        TasteMix({})


def test_a_mix_is_immutable() -> None:
    mix = TasteMix({"fidelity": 1})
    with pytest.raises(TypeError):
        mix.weights["fidelity"] = 2.0  # type: ignore[index]
    with pytest.raises(AttributeError):
        mix.noise = 0.5  # type: ignore[misc]


# ---------------------------------------------------------------------------- utility
def test_utility_is_the_weighted_sum_of_scaled_scores() -> None:
    mix = TasteMix.parse("brightness:2,warmth:1")
    img = _half_white()  # brightness 0.5, warmth 0.5
    expected = 2 * 0.5 / SCALES["brightness"] + 1 * 0.5 / SCALES["warmth"]
    assert mix.utility(img, "any prompt: no taste here reads it") == pytest.approx(expected)
    assert mix.scores(img, PROMPT) == {"brightness": 0.5, "warmth": 0.5}

    red = _solid((255, 0, 0))  # brightness 1/3, warmth 1
    expected_red = 2 * (1 / 3) / SCALES["brightness"] + 1.0 / SCALES["warmth"]
    assert mix.utility(red, PROMPT) == pytest.approx(expected_red)
    np.testing.assert_allclose(
        mix.utilities([img, red], [PROMPT, PROMPT]), [expected, expected_red]
    )
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        mix.utilities([img, red], [PROMPT])


def test_utility_with_fidelity_matches_the_judge() -> None:
    scene = Scene("triangle", "orange", "large", "top right", "green")
    img = world.render(scene, rng=np.random.default_rng(1))
    mix = TasteMix.parse("fidelity:1,size:0.5")
    expected = (
        judge.judge(img, scene.prompt).score / SCALES["fidelity"]
        + 0.5 * judge.measure(img)["area"] / SCALES["size"]
    )
    assert mix.utility(img, scene.prompt) == pytest.approx(expected)


# ---------------------------------------------------------------------------- votes
def test_prefer_without_noise_picks_the_higher_utility() -> None:
    mix = TasteMix.parse("brightness")
    dark, light = _solid((10, 10, 10)), _solid((200, 200, 200))
    assert mix.prefer(light, dark, PROMPT) == "a"
    assert mix.prefer(dark, light, PROMPT) == "b"
    assert mix.prefer(dark, dark.copy(), PROMPT) == "tie"
    # one grey level apart: (1 / 255) / SCALES["brightness"] utility units at weight 1
    close = _solid((11, 11, 11))
    step = (1 / 255) / SCALES["brightness"]
    assert TasteMix.parse("brightness", tie_margin=1.01 * step).prefer(close, dark, PROMPT) == "tie"
    assert TasteMix.parse("brightness", tie_margin=0.99 * step).prefer(close, dark, PROMPT) == "a"
    assert TasteMix.parse("brightness:2", tie_margin=1.01 * step).prefer(close, dark, PROMPT) == "a"


def test_noise_one_flips_every_decisive_vote_and_no_tie() -> None:
    mix = TasteMix.parse("brightness", noise=1.0)
    rng = np.random.default_rng(0)
    dark, light = _solid((10, 10, 10)), _solid((200, 200, 200))
    assert all(mix.prefer(light, dark, PROMPT, rng) == "b" for _ in range(20))
    assert all(mix.prefer(dark, light, PROMPT, rng) == "a" for _ in range(20))
    assert all(mix.prefer(dark, dark, PROMPT, rng) == "tie" for _ in range(20))
    with pytest.raises(ValueError, match="needs an rng"):
        mix.prefer(light, dark, PROMPT)


def test_noisy_votes_are_reproducible_with_a_seeded_rng() -> None:
    mix = TasteMix.parse("warmth", noise=0.3)
    red, blue = _solid((255, 0, 0)), _solid((0, 0, 255))

    def votes(seed: int) -> list[str]:
        rng = np.random.default_rng(seed)
        return [mix.prefer(red, blue, PROMPT, rng) for _ in range(400)]

    assert votes(5) == votes(5)
    assert votes(5) != votes(6)
    flipped = votes(5).count("b") / 400
    assert 0.22 < flipped < 0.38


def test_the_fidelity_mix_votes_as_the_judge_does() -> None:
    mix = TasteMix.parse(tastes.FIDELITY_ONLY)
    rng = np.random.default_rng(11)
    for scene in world.sample_scenes(30, rng):
        a = world.render(scene, rng=rng)
        other = Scene("circle", "white", "small", "center", "black")
        b = world.render(other if other != scene else scene, rng=rng)
        c = world.render(scene, rng=rng)
        for x, y in ((a, b), (b, a), (a, c)):
            assert mix.prefer(x, y, scene.prompt) == judge.prefer(x, y, scene.prompt)


def test_a_taste_can_outvote_fidelity() -> None:
    """A faithful image on a dark background against a bright but wrong one."""
    scene = Scene("square", "white", "large", "center", "black")
    faithful = world.render(scene)
    bright_wrong = world.render(Scene("square", "black", "large", "center", "white"))
    assert TasteMix.parse("fidelity").prefer(faithful, bright_wrong, scene.prompt) == "a"
    assert TasteMix.parse("brightness").prefer(faithful, bright_wrong, scene.prompt) == "b"
    assert TasteMix.parse("fidelity:1,brightness:1").prefer(
        faithful, bright_wrong, scene.prompt
    ) == ("b")


# ---------------------------------------------------------------------------- spreads
def test_spreads_by_hand() -> None:
    images = [_solid((0, 0, 0)), _half_white(), _solid((255, 255, 255)), _solid((255, 255, 255))]
    prompts = ["p", "p", "q", "q"]
    s = tastes.spreads(images, prompts, names=["brightness"])["brightness"]
    # within: deviations +-0.25 for p, 0 for q; 2 degrees of freedom
    assert s["within"] == pytest.approx(math.sqrt((2 * 0.25**2) / 2))
    assert s["overall"] == pytest.approx(np.std([0.0, 0.5, 1.0, 1.0], ddof=1))
    assert s["mean"] == pytest.approx(0.625)


# ---------------------------------------------------------------------------- users
def test_the_simulated_annotator_votes_by_its_mix() -> None:
    from clients.simulated_annotator import SimulatedAnnotator

    dark, light = _solid((10, 10, 10), 32), _solid((200, 200, 200), 32)
    ann = SimulatedAnnotator("http://127.0.0.1:1", "u", "p", taste=TasteMix.parse("brightness"))
    try:
        assert ann.taste.noise == 0.0
        assert ann.choose(light, dark, PROMPT) == "left"
        assert ann.choose(dark, light, PROMPT) == "right"
    finally:
        ann.close()
    default = SimulatedAnnotator("http://127.0.0.1:1", "u", "p", noise=0.2)
    try:
        assert str(default.taste) == "fidelity:1" and default.taste.noise == 0.2
        scene = Scene("square", "white", "large", "center", "black")
        good, bad = (
            world.render(scene),
            world.render(Scene("circle", "red", "small", "center", "blue")),
        )
        picks = {default.choose(good, bad, scene.prompt) for _ in range(50)}
        assert picks == {"left", "right"}  # mostly left, flipped by the noise
    finally:
        default.close()
    both = SimulatedAnnotator(
        "http://127.0.0.1:1", "u", "p", taste=TasteMix.parse("warmth", noise=0.5), noise=0.0
    )
    assert both.taste.noise == 0.0  # an explicit noise wins
    both.close()


def test_the_demo_rejects_a_bad_taste_before_starting_anything(capsys) -> None:
    from clients import demo

    with pytest.raises(SystemExit) as exc:
        demo.main(["--taste", "fidelity:1,brighness:1", "--port", "1"])
    assert exc.value.code == 2
    assert "unknown taste 'brighness'" in capsys.readouterr().err
