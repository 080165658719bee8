"""A real API server for the operator CLI's tests.

``backend.main.create_app()`` served by uvicorn in a thread on a temporary SQLite data dir (the
local mode ``prefloop serve`` runs; no UI mounted, no workers: rounds stay queued), seeded with
an annotator, two pairs of the base version and a candidate version child of the base.
"""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from PIL import Image

ADMIN_PASSWORD = "cli-admin-password-1"
ANNOTATOR = ("ann_cli", "annotator-pw-1")


@dataclass
class LiveApi:
    url: str
    settings: object
    candidate_id: int
    base_id: int


def _png(shade: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (shade, 40, 200)).save(buf, format="PNG")
    return buf.getvalue()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def live_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApi]:
    import uvicorn

    from backend.db import Database
    from backend.dispatch import NullDispatcher
    from backend.main import create_app
    from backend.migrate import upgrade
    from backend.models import ModelVersion, PairKind, UserRole, VersionStatus
    from backend.security import PasswordService
    from backend.services import images as image_service
    from backend.services import pairs as pair_service
    from backend.services import prompts as prompt_service
    from backend.services import users as user_service
    from backend.services import versions as version_service
    from backend.settings import Settings
    from backend.storage import ImageStore

    data_dir = tmp_path_factory.mktemp("prefloop-cli")
    env = pytest.MonkeyPatch()
    env.setenv("PREFLOOP_DATA_DIR", str(data_dir))
    env.setenv("PREFLOOP_ADMIN_PASSWORD", ADMIN_PASSWORD)
    settings = Settings(
        argon2_time_cost=1,
        argon2_memory_kib=8192,
        log_json=False,
        log_level="WARNING",
        login_rate_limit_attempts=1000,  # every test signs in
    )
    upgrade(settings.db_url)
    port = _free_port()
    app = create_app(settings=settings, dispatcher=NullDispatcher())
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)

    db = Database(settings.db_url, pool_size=2, max_overflow=0)
    with db.transaction() as session:
        base = version_service.ensure_base_version(session, settings.base_model)
        candidate = ModelVersion(
            name="cli-candidate",
            base_model=settings.base_model,
            status=VersionStatus.candidate,
            parent_id=base.id,
            metrics={},
        )
        session.add(candidate)
        prompt_service.add_prompts(session, [prompt_service.PromptIn("a red square", "cli")])
        prompt_id = prompt_service.list_prompts(session, offset=0, limit=1, active=None)[0][0].id
        images = [
            image_service.store_image(
                session,
                ImageStore(settings.images_dir),
                version_id=base.id,
                prompt_id=prompt_id,
                data=_png(shade),
                seed=seed,
                cfg=3.0,
                steps=20,
                sampler="ddim",
                width=8,
                height=8,
            )
            for seed, shade in enumerate((10, 90, 170, 250))
        ]
        for a, b in ((0, 1), (2, 3)):
            pair_service.create_pair(
                session,
                kind=PairKind.within_version,
                image_a_id=images[a].id,
                image_b_id=images[b].id,
            )
        user_service.create_user(
            session,
            PasswordService(time_cost=1, memory_kib=8192),
            username=ANNOTATOR[0],
            password=ANNOTATOR[1],
            role=UserRole.annotator,
        )
        session.flush()
        ids = (candidate.id, base.id)
    db.dispose()
    try:
        yield LiveApi(
            url=f"http://127.0.0.1:{port}", settings=settings, candidate_id=ids[0], base_id=ids[1]
        )
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        env.undo()
