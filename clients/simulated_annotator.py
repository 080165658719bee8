"""A simulated annotator: votes through the public HTTP API like a person, guided by its taste.

It signs in (registering first when open sign-up is on), asks ``GET /api/v1/pairs/next``,
downloads both images, and picks the one its *taste* prefers: a weighted mix of the built-in
world's programmatic judge (``fidelity``: which image matches the prompt better) and tastes with
one shared direction (brighter, larger, more centred, warmer; :mod:`worker.shapes.tastes`). It
flips that answer with probability ``noise`` (label noise), and posts the vote with a
``client_vote_id`` so that a retried request counts once. It knows nothing of the database or of
model versions: only the v1 contract in docs/product.md, through
:class:`prefloop_client.PrefloopClient`.

Used by ``make demo``, the end-to-end tests and the benchmarks::

    python -m clients.simulated_annotator --url http://127.0.0.1:8000 --votes 200 --noise 0.1
    python -m clients.simulated_annotator --taste "fidelity:1,brightness:0.5" --noise 0.1

The default taste is ``fidelity`` alone: the judge's choice.
"""

from __future__ import annotations

import argparse
import io
import logging
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from prefloop_client import ApiError, Choice, ImageRef, NoPairReady, PrefloopClient, Unauthorized
from worker.shapes.tastes import FIDELITY_ONLY, TasteMix, available_tastes

log = logging.getLogger("prefloop.simulated_annotator")

CHOICE_FOR: dict[str, Choice] = {"a": "left", "b": "right", "tie": "tie"}


@dataclass
class AnnotatorStats:
    """What one annotator did; ``counts`` is keyed by choice (left/right/tie/...)."""

    votes: int = 0
    empty_polls: int = 0
    errors: int = 0
    counts: dict[str, int] = field(default_factory=dict)


class SimulatedAnnotator:
    """One simulated person.

    Args:
        base_url: the server root, e.g. ``http://127.0.0.1:8000``.
        username, password: the account; registered first when ``register`` is true and the
            login fails (open sign-up is on by default in local mode).
        taste: what the annotator prefers (default: ``fidelity`` alone, the judge's choice).
        noise: probability of flipping a decisive choice (left <-> right); when given, it
            replaces ``taste.noise``; without a taste it defaults to 0.1.
        seed: seeds the noise, so a run is reproducible given the pairs served.
    """

    def __init__(
        self,
        base_url: str,
        username: str,
        password: str,
        *,
        taste: TasteMix | None = None,
        noise: float | None = None,
        seed: int = 0,
        register: bool = True,
        timeout: float = 30.0,
    ) -> None:
        if taste is None:
            taste = TasteMix.parse(FIDELITY_ONLY, noise=0.1 if noise is None else noise)
        elif noise is not None:
            taste = TasteMix(taste.weights, noise=noise, tie_margin=taste.tie_margin)
        self.taste = taste
        self.username, self.password = username, password
        self.noise, self.register = taste.noise, register
        self.rng = np.random.default_rng(seed)
        self.client = PrefloopClient(base_url, timeout_s=timeout)
        self.stats = AnnotatorStats()
        self._token: str | None = None

    # ------------------------------------------------------------------ auth
    def login(self) -> None:
        """Sign in; on a 401 with ``register`` on, create the account first (open sign-up)."""
        try:
            self._token = self.client.login(self.username, self.password)
            return
        except Unauthorized:
            if not self.register:
                raise
        try:
            self.client.register(self.username, self.password)
        except ApiError as exc:
            if exc.status_code != 409:  # 409: registered meanwhile by another run
                raise RuntimeError(f"register failed for {self.username}: {exc}") from exc
        self._token = self.client.login(self.username, self.password)

    @property
    def token(self) -> str:
        """The annotator's bearer token (signing in first when needed)."""
        if self._token is None:
            self.login()
        return self._token or ""

    # ------------------------------------------------------------------ one vote
    def _image(self, token: str, image: ImageRef) -> np.ndarray:
        content, _ = self.client.image_bytes(token, image)
        return np.asarray(Image.open(io.BytesIO(content)).convert("RGB"))

    def choose(self, left: np.ndarray, right: np.ndarray, prompt: str) -> Choice:
        """The taste's choice for (left, right), with label noise applied."""
        return CHOICE_FOR[self.taste.prefer(left, right, prompt, self.rng)]

    def step(self) -> str | None:
        """Ask for a pair and vote on it. Returns the choice, or None when no pair was ready."""
        if self._token is None:
            self.login()
        try:
            pair = self.client.next_pair(self._token or "")
        except Unauthorized:  # the token expired: sign in again, once
            self.login()
            pair = self.client.next_pair(self._token or "")
        if isinstance(pair, NoPairReady):
            self.stats.empty_polls += 1
            return None
        token = self._token or ""
        shown = time.perf_counter()
        left = self._image(token, pair.left)
        right = self._image(token, pair.right)
        choice = self.choose(left, right, pair.prompt)
        try:
            self.client.vote(
                token,
                pair_id=pair.pair_id,
                choice=choice,
                client_vote_id=str(uuid.uuid4()),
                latency_ms=int((time.perf_counter() - shown) * 1000),
            )
        except ApiError as exc:
            self.stats.errors += 1
            log.warning("vote rejected: %s", exc)
            return None
        self.stats.votes += 1
        self.stats.counts[choice] = self.stats.counts.get(choice, 0) + 1
        return choice

    def run(
        self, votes: int, *, max_seconds: float = 600.0, idle_sleep: float = 1.0
    ) -> AnnotatorStats:
        """Vote until ``votes`` votes are in or ``max_seconds`` have passed."""
        deadline = time.monotonic() + max_seconds
        while self.stats.votes < votes and time.monotonic() < deadline:
            if self.step() is None:
                time.sleep(idle_sleep)
        return self.stats

    def close(self) -> None:
        self.client.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--username", default="sim-annotator")
    p.add_argument("--password", default="sim-annotator-password")
    p.add_argument("--votes", type=int, default=100)
    p.add_argument("--noise", type=float, default=0.1, help="label noise (default 0.1)")
    p.add_argument(
        "--taste",
        default=FIDELITY_ONLY,
        help="weighted tastes, e.g. 'fidelity:1,brightness:0.5' (a bare name weighs 1); "
        f"tastes: {', '.join(available_tastes())} (default: {FIDELITY_ONLY})",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-seconds", type=float, default=600)
    a = p.parse_args(argv)
    try:
        taste = TasteMix.parse(a.taste, noise=a.noise)
    except ValueError as exc:
        p.error(f"--taste/--noise: {exc}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    log.info("taste: %s", taste.describe())
    ann = SimulatedAnnotator(a.url, a.username, a.password, taste=taste, seed=a.seed)
    try:
        stats = ann.run(a.votes, max_seconds=a.max_seconds)
    finally:
        ann.close()
    print(
        f"votes={stats.votes} empty_polls={stats.empty_polls} errors={stats.errors} counts={stats.counts}"
    )
    return 0 if stats.votes >= a.votes else 1


if __name__ == "__main__":
    raise SystemExit(main())
