"""Image latency by storage: ``GET /api/v1/images/{id}`` from local disk, from S3 through the
API (proxy, with and without its in-process cache), and the redirect alternative.

Real processes: an S3-compatible server (moto's server mode, ``python -m moto.server``) and one
``uvicorn`` API server per configuration, all on loopback, each in its own process; the client
(httpx, one persistent connection per host, requests one after another) in this one. One SQLite
database holds the image rows; the same bytes are stored on disk and in the bucket.

    python -m bench.storage            # 2 image sizes x 600 requests per configuration
    python -m bench.storage --quick    # 200 requests (well under 2 minutes)

Configurations (each a row per image size):

- ``local``: ``PREFLOOP_STORAGE_URL`` unset; the API reads the file from disk.
- ``s3 proxy, cold``: the API reads every image from the bucket (``PREFLOOP_IMAGE_CACHE_MB=0``).
- ``s3 proxy, warm``: the API answers from its cache (every image fetched once before timing).
  An image is served to ``pair_overlap`` (3) annotators, so in production about two in three
  fetches are warm.
- ``s3 redirect``: what a 307 to a presigned URL would cost, measured as its parts, per request:
  the API's answer without reading storage (the same request with ``If-None-Match``: signature
  check, row lookup, a 304) + presigning the URL (botocore, in this process) + the browser's
  second request, to the presigned URL on the S3 server. The API does not implement this mode
  (docs/scaling.md says why); the row is here to show what the choice cost.

Numbers depend on the machine: on a loaded 2-core machine with a Python S3 server (moto) the
S3 rows are pessimistic about a real S3 endpoint's per-request time, not about the shape.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.report import fmt, format_table

SECRET = "bench-storage-secret-key-" + "x" * 32
BUCKET = "prefloop-bench"
PREFIX = "bench"
CREDS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_http(url: str, timeout: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            httpx.get(url, timeout=2.0)
            return
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer") from None
            time.sleep(0.2)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def _png(size: int, rng: random.Random) -> bytes:
    """A PNG of ``size`` px: the built-in model's 32 px, or an SD-sized noisy 512 px image
    (PNG compresses it little, like a photograph)."""
    import numpy as np
    from PIL import Image

    g = np.random.default_rng(rng.randrange(2**32))
    base = np.linspace(0, 255, size, dtype=np.float32)[None, :, None]
    pixels = base + g.normal(0, 24, (size, size, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype("uint8"), "RGB").save(buf, "PNG")
    return buf.getvalue()


@dataclass
class Stack:
    data_dir: Path
    endpoint: str
    procs: list[subprocess.Popen[bytes]]

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(CREDS)
        env.update(
            PREFLOOP_DATA_DIR=str(self.data_dir),
            PREFLOOP_DATABASE_URL=f"sqlite:///{self.data_dir / 'prefloop.db'}",
            PREFLOOP_ADMIN_PASSWORD="bench-admin-password",
            PREFLOOP_SECRET_KEY=SECRET,
            PREFLOOP_LOG_LEVEL="WARNING",
            PREFLOOP_S3_ENDPOINT_URL=self.endpoint,
            PREFLOOP_S3_REGION="us-east-1",
        )
        env.update(extra)
        return env

    def api(self, name: str, **settings: str) -> str:
        port = _free_port()
        log = open(self.data_dir / f"api-{name}.log", "wb")  # noqa: SIM115 - the child keeps it
        cmd = [
            sys.executable,
            "-m",
            "uvicorn",
            "backend.main:create_app",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-access-log",
            "--log-level",
            "warning",
        ]
        proc = subprocess.Popen(
            cmd, env=self.env(**settings), start_new_session=True, stdout=log, stderr=log
        )
        self.procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        _wait_http(f"{url}/healthz")
        return url


def start_stack(data_dir: Path) -> Stack:
    port = _free_port()
    log = open(data_dir / "moto.log", "wb")  # noqa: SIM115 - the child keeps it open
    moto = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, **CREDS},
        start_new_session=True,
        stdout=log,
        stderr=log,
    )
    stack = Stack(data_dir, f"http://127.0.0.1:{port}", [moto])
    _wait_http(stack.endpoint)
    return stack


def seed(stack: Stack, sizes: dict[str, int], per_size: int) -> dict[str, list[int]]:
    """Image rows, with the same bytes on disk and in the bucket; returns ids per size."""
    import boto3
    from sqlalchemy import insert

    from backend.db import make_engine
    from backend.migrate import upgrade
    from backend.models import Image, ModelVersion, Prompt, VersionStatus
    from backend.settings import Settings
    from backend.storage import image_store

    boto3.client(
        "s3",
        endpoint_url=stack.endpoint,
        region_name="us-east-1",
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
    ).create_bucket(Bucket=BUCKET)
    url = f"sqlite:///{stack.data_dir / 'prefloop.db'}"
    upgrade(url)
    local = image_store(Settings(data_dir=stack.data_dir))
    s3 = image_store(
        Settings(
            data_dir=stack.data_dir,
            storage_url=f"s3://{BUCKET}/{PREFIX}",
            s3_endpoint_url=stack.endpoint,
            s3_region="us-east-1",
            s3_access_key_id="bench",
            s3_secret_access_key="bench",
        )
    )
    rng = random.Random(0)
    engine = make_engine(url)
    ids: dict[str, list[int]] = {}
    with engine.begin() as conn:
        version_id = conn.execute(
            insert(ModelVersion).returning(ModelVersion.id),
            [{"name": "bench", "base_model": "builtin:shapes", "status": VersionStatus.retired}],
        ).scalar_one()
        prompt_id = conn.execute(
            insert(Prompt).returning(Prompt.id), [{"text": "bench prompt"}]
        ).scalar_one()
        for label, px in sizes.items():
            rows = []
            for i in range(per_size):
                data = _png(px, rng)
                rel, sha = local.save(data, "image/png")
                assert s3.save(data, "image/png") == (rel, sha)
                rows.append(
                    dict(
                        version_id=version_id,
                        prompt_id=prompt_id,
                        seed=i,
                        cfg=3.0,
                        steps=20,
                        sampler="ddim",
                        width=px,
                        height=px,
                        sha256=sha,
                        storage_path=rel,
                        media_type="image/png",
                    )
                )
            ids[label] = list(
                conn.execute(
                    insert(Image).returning(Image.id, sort_by_parameter_order=True), rows
                ).scalars()
            )
    engine.dispose()
    return ids


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _time_gets(client: Any, urls: list[str], headers: dict[str, str] | None = None) -> list[float]:
    out = []
    for url in urls:
        t = time.perf_counter()
        r = client.get(url, headers=headers)
        out.append((time.perf_counter() - t) * 1000)
        if r.status_code not in (200, 304):
            raise RuntimeError(f"GET {url}: {r.status_code} {r.text[:200]}")
    return out


def run(requests: int, per_size: int) -> dict[str, Any]:
    import httpx

    from backend.api.state import ImageSigner
    from backend.settings import Settings
    from backend.storage import image_store

    sizes = {"32 px (built-in)": 32, "512 px (SD-sized)": 512}
    data_dir = Path(tempfile.mkdtemp(prefix="prefloop-bench-storage-"))
    stack = start_stack(data_dir)
    try:
        ids = seed(stack, sizes, per_size)
        s3 = {"PREFLOOP_STORAGE_URL": f"s3://{BUCKET}/{PREFIX}"}
        apis = {
            "local": stack.api("local"),
            "s3 proxy, cold": stack.api("s3-cold", **s3, PREFLOOP_IMAGE_CACHE_MB="0"),
            "s3 proxy, warm": stack.api("s3-warm", **s3, PREFLOOP_IMAGE_CACHE_MB="256"),
        }
        signer = ImageSigner(SECRET)
        s3_images = image_store(
            Settings(
                data_dir=data_dir,
                storage_url=f"s3://{BUCKET}/{PREFIX}",
                s3_endpoint_url=stack.endpoint,
                s3_region="us-east-1",
                s3_access_key_id="bench",
                s3_secret_access_key="bench",
            )
        )
        rng = random.Random(1)
        rows: list[dict[str, Any]] = []
        for label, image_ids in ids.items():
            with httpx.Client(timeout=30) as c:
                etags = {
                    i: c.get(f"{apis['local']}{signer.url(i)}").headers["etag"] for i in image_ids
                }
            sizes_kb = statistics.mean(
                len(s3_images.objects.read(_rel(data_dir, i))) for i in image_ids[:8]
            )
            order = [rng.choice(image_ids) for _ in range(requests)]
            for name, base in apis.items():
                with httpx.Client(timeout=30) as c:
                    if name == "s3 proxy, warm":
                        _time_gets(c, [f"{base}{signer.url(i)}" for i in image_ids])
                    _time_gets(c, [f"{base}{signer.url(i)}" for i in order[:20]])  # connect
                    ms = _time_gets(c, [f"{base}{signer.url(i)}" for i in order])
                rows.append(dict(size=label, mode=name, ms=ms, kb=sizes_kb / 1024))
            # The redirect: the API's 304 (no storage read) + presign + GET the presigned URL.
            with httpx.Client(timeout=30) as api, httpx.Client(timeout=30) as bucket:
                base = apis["local"]
                for i in order[:20]:
                    api.get(f"{base}{signer.url(i)}", headers={"If-None-Match": etags[i]})
                first = []
                for i in order:
                    t = time.perf_counter()
                    r = api.get(f"{base}{signer.url(i)}", headers={"If-None-Match": etags[i]})
                    assert r.status_code == 304
                    first.append((time.perf_counter() - t) * 1000)
                signed, second = [], []
                for i in order:
                    t = time.perf_counter()
                    url = s3_images.objects.presign(_rel(data_dir, i), 300)
                    signed.append((time.perf_counter() - t) * 1000)
                    t = time.perf_counter()
                    r = bucket.get(str(url))
                    assert r.status_code == 200
                    second.append((time.perf_counter() - t) * 1000)
            total = [a + b + c for a, b, c in zip(first, signed, second, strict=True)]
            rows.append(
                dict(
                    size=label,
                    mode="s3 redirect (307 + presigned GET)",
                    ms=total,
                    kb=sizes_kb / 1024,
                    parts={
                        "api_304_p50": statistics.median(first),
                        "presign_p50": statistics.median(signed),
                        "bucket_get_p50": statistics.median(second),
                    },
                )
            )
        return {"rows": rows, "requests": requests, "images_per_size": per_size}
    finally:
        for proc in reversed(stack.procs):
            _stop(proc)


_rel_cache: dict[int, str] = {}


def _rel(data_dir: Path, image_id: int) -> str:
    if image_id not in _rel_cache:
        from sqlalchemy import create_engine, select

        from backend.models import Image

        engine = create_engine(f"sqlite:///{data_dir / 'prefloop.db'}")
        with engine.connect() as conn:
            for iid, rel in conn.execute(select(Image.id, Image.storage_path)):
                _rel_cache[int(iid)] = str(rel)
        engine.dispose()
    return _rel_cache[image_id]


def local_read_overhead(n: int = 2000) -> dict[str, float]:
    """Microseconds per read of one small file: fsspec's local filesystem (what the store
    uses) vs ``Path.read_bytes`` (what a special-cased local path would use)."""
    import fsspec

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.png"
        path.write_bytes(os.urandom(2048))
        fs = fsspec.filesystem("file")
        out = {}
        for name, read in (
            ("fsspec cat_file", lambda: fs.cat_file(str(path))),
            ("Path.read_bytes", path.read_bytes),
        ):
            for _ in range(100):
                read()
            t = time.perf_counter()
            for _ in range(n):
                read()
            out[name] = (time.perf_counter() - t) / n * 1e6
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="200 requests per row")
    ap.add_argument("--requests", type=int, default=None, help="requests per row")
    ap.add_argument("--images", type=int, default=None, help="distinct images per size")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = ap.parse_args(argv)
    requests = a.requests or (200 if a.quick else 600)
    result = run(requests, per_size=a.images or (40 if a.quick else 100))
    table = [
        [
            r["size"],
            r["mode"],
            fmt(r["kb"], 1),
            fmt(statistics.median(r["ms"]), 2),
            fmt(_pct(r["ms"], 0.95), 2),
        ]
        for r in result["rows"]
    ]
    print(
        f"GET /api/v1/images/{{id}}, {requests} sequential requests per row "
        f"({result['images_per_size']} distinct images per size)\n"
    )
    print(format_table(["image", "storage / delivery", "KB", "p50 ms", "p95 ms"], table))
    for r in result["rows"]:
        if "parts" in r:
            p = r["parts"]
            print(
                f"  redirect parts, {r['size']}: API 304 {p['api_304_p50']:.2f} ms + presign "
                f"{p['presign_p50']:.2f} ms + bucket GET {p['bucket_get_p50']:.2f} ms (p50)"
            )
    overhead = local_read_overhead()
    print("local read of a 2 KB file: " + ", ".join(f"{k} {v:.1f} us" for k, v in overhead.items()))
    if a.json:
        a.json.write_text(
            json.dumps(
                {
                    **result,
                    "rows": [
                        {
                            **{k: v for k, v in r.items() if k != "ms"},
                            "p50_ms": statistics.median(r["ms"]),
                            "p95_ms": _pct(r["ms"], 0.95),
                        }
                        for r in result["rows"]
                    ],
                    "local_read_us": overhead,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
