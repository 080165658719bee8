"""Schemathesis against the whole API with all of its checks, at volume.

The suite's ``tests/backend/test_fuzz.py`` sends a few examples per operation; this sends
thousands. For every operation of the app's own OpenAPI document, Schemathesis generates
valid (positive) and invalid (negative) requests, sent as the admin and as an annotator to an
in-process app on a fresh database with a few pairs. Every response goes through all of
Schemathesis' checks (no 5xx; status code, content type, headers and body conform to the
document; negative data rejected; positive data accepted; ...), and a refused request (4xx)
must leave every table's row count unchanged. It prints the requests sent, the statuses seen
and every failure, and exits 1 on any failure.

    python -m bench.api_fuzz                     # about 10,000 requests, SQLite
    python -m bench.api_fuzz --database postgresql   # the same on PostgreSQL (127.0.0.1:5432)
    python -m bench.api_fuzz --quick             # about 1,000 requests
"""

from __future__ import annotations

import argparse
import collections
import io
import os
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path

PG_ADMIN_URL = os.environ.get(
    "PREFLOOP_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def _png(rng: random.Random) -> bytes:
    from PIL import Image

    im = Image.new("RGB", (4, 4), tuple(rng.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _seed(state, n_pairs: int, rng: random.Random) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy import select

    from backend.models import ModelVersion, PairKind, Prompt
    from backend.services import images as image_service
    from backend.services import pairs as pair_service

    with state.db.transaction() as s:
        vid = s.scalar(select(ModelVersion.id).where(ModelVersion.name == "builtin:shapes"))
        for i in range(n_pairs):
            p = Prompt(text=f"a small shape {i} {uuid.uuid4().hex[:6]}", source="bench")
            s.add(p)
            s.flush()
            ims = [
                image_service.store_image(
                    s,
                    state.store,
                    version_id=vid,
                    prompt_id=p.id,
                    data=_png(rng),
                    seed=rng.randrange(2**31),
                    cfg=7.5,
                    steps=20,
                    sampler="ddim",
                    width=4,
                    height=4,
                )
                for _ in range(2)
            ]
            pair_service.create_pair(
                s,
                kind=PairKind.within_version,
                image_a_id=ims[0].id,
                image_b_id=ims[1].id,
                rng=rng,
            )


def _counts(state) -> dict[str, int]:  # type: ignore[no-untyped-def]
    from sqlalchemy import text

    from backend.models import Base

    with state.db.read_session() as s:
        return {
            t.name: int(s.execute(text(f"SELECT count(*) FROM {t.name}")).scalar_one())
            for t in Base.metadata.sorted_tables
        }


#: Uploads whose content the document cannot describe (as in tests/backend/test_fuzz.py): only
#: "valid data rejected" (ST202) is excused, only for these.
UNEXPRESSIBLE = {("POST", "/api/v1/prompts"), ("POST", "/api/v1/import")}


def _unexpressible(case, failure: str) -> bool:  # type: ignore[no-untyped-def]
    return failure.startswith("- ST202") and (case.method, case.path) in UNEXPRESSIBLE


def run(requests: int, database: str, seed: int) -> int:
    import schemathesis
    from fastapi.testclient import TestClient
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.checks import CHECKS, load_all_checks
    from schemathesis.core.failures import FailureGroup
    from schemathesis.python import asgi
    from sqlalchemy import create_engine, text

    from backend.dispatch import NullDispatcher
    from backend.main import create_app
    from backend.migrate import upgrade
    from backend.models import User, UserRole
    from backend.settings import Settings

    load_all_checks()
    checks = CHECKS.get_all()
    tmp = Path(tempfile.mkdtemp(prefix="prefloop-fuzz-"))
    drop = None
    if database == "sqlite":
        url = f"sqlite:///{tmp / 'fuzz.db'}"
    else:
        from sqlalchemy.engine import make_url

        name = f"prefloop_fuzz_{uuid.uuid4().hex[:10]}"
        admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        url = make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)

        def drop() -> None:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()

    try:
        upgrade(url)
        app = create_app(
            Settings(
                database_url=url,
                data_dir=tmp,
                admin_password="admin-password-1",
                secret_key="bench-secret-key-0123456789-abcdefghijklmnop",
                argon2_time_cost=1,
                argon2_memory_kib=64,
                max_upload_bytes=256 * 1024,
                gold_fraction=0.0,
                log_level="CRITICAL",
                open_signup=True,
                login_rate_limit_attempts=1_000_000,
                register_rate_limit_attempts=1_000_000,
            ),
            NullDispatcher(),
        )
        with TestClient(app):  # runs start-up (admin account, base version)
            state = app.state.prefloop
            rng = random.Random(seed)
            _seed(state, 20, rng)
            with state.db.transaction() as s:
                admin_id = s.query(User.id).filter(User.username == "admin").scalar()
                ann = User(
                    username="fuzz-annotator",
                    password_hash=state.passwords.hash("password-123"),
                    role=UserRole.annotator,
                )
                s.add(ann)
                s.flush()
                ann_id = ann.id
            # The annotator first: the admin's requests may ban or demote it.
            roles = {"annotator": ann_id, "admin": admin_id}

            def auth(uid: int) -> dict[str, str]:
                """A token at the user's current token_version (a fuzzed logout or
                password change ends the previous one)."""
                with state.db.read_session() as s:
                    user = s.get(User, uid)
                    token = state.tokens.issue(uid, user.role.value, user.token_version)
                return {"Authorization": f"Bearer {token}"}

            schema = schemathesis.openapi.from_dict(app.openapi())
            operations = [r.ok() for r in schema.get_all_operations()]
            runs = len(operations) * 2 * len(roles)
            statuses: collections.Counter[int] = collections.Counter()
            excused: collections.Counter[str] = collections.Counter()
            failures: list[str] = []
            sent = 0
            t0 = time.perf_counter()

            def make(operation, mode, http, uid, round_no):  # type: ignore[no-untyped-def]
                @hypothesis_seed(seed * 1000 + round_no)
                @given(case=operation.as_strategy(generation_mode=mode))
                @settings(
                    max_examples=per_run,
                    deadline=None,
                    database=None,
                    phases=[Phase.explicit, Phase.generate],
                    suppress_health_check=list(HealthCheck),
                )
                def one(case: schemathesis.Case) -> None:
                    nonlocal sent
                    headers = auth(uid)
                    before = _counts(state)
                    response = case.call(session=http, headers=headers)
                    sent += 1
                    statuses[response.status_code] += 1
                    where = f"{case.method} {case.formatted_path} [{mode.value}]"
                    try:
                        case.validate_response(response, checks=checks, headers=headers)
                    except (AssertionError, FailureGroup) as exc:
                        found = [
                            ln.strip()
                            for ln in str(exc).splitlines()
                            if ln.strip().startswith("- ")
                        ]
                        if not all(_unexpressible(case, f) for f in found):
                            failures.append(
                                f"{where} -> {response.status_code}: {'; '.join(found)}"
                            )
                        else:
                            excused[f"{case.method} {case.path}"] += 1
                    if 400 <= response.status_code < 500 and _counts(state) != before:
                        failures.append(f"{where} -> {response.status_code}: refused but wrote")

                return one

            with asgi.get_client(app) as http:
                round_no = 0
                while sent < requests:  # rounds with new seeds until enough were sent
                    per_run = max(1, (requests - sent) // runs)
                    for uid in roles.values():
                        for operation in operations:
                            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                                try:
                                    make(operation, mode, http, uid, round_no)()
                                except Unsatisfiable:
                                    pass  # no invalid request exists without any input
                    round_no += 1
            elapsed = time.perf_counter() - t0
    finally:
        if drop is not None:
            drop()

    print(f"database: {database}; operations: {len(operations)}; roles: annotator, admin")
    print(f"checks: {', '.join(c.__name__ for c in checks)}")
    print(f"requests: {sent} in {elapsed:.0f} s ({sent / elapsed:.0f}/s)")
    print("statuses: " + ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items())))
    for where, n in excused.items():
        print(f"excused: {n} x ST202 (valid-by-schema upload refused) on {where}")
    distinct = collections.Counter(failures)
    print(f"failures: {len(failures)} ({len(distinct)} distinct)")
    for line, n in distinct.most_common(30):
        print(f"  {n} x {line}")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="about 1,000 requests")
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    n = 1_000 if args.quick else args.requests
    return run(n, args.database, args.seed)


if __name__ == "__main__":
    sys.exit(main())
