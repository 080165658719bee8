"""A bounded on-disk cache of image bytes fetched from the API, for Gradio to serve.

The API serves images only to a signed-in user (bearer token), which a browser ``<img src>``
cannot send. So the UI server fetches the bytes with the user's token, writes them here, and
hands Gradio a file path; Gradio serves the file to the browser from the UI's own origin.

Images are immutable and addressed by id, so a file is written once and reused. The original
bytes are kept as they are: no re-encoding, so annotators judge exactly what the model produced.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path

from backend.fileio import atomic_write

_SAFE_ID = re.compile(r"^[A-Za-z0-9_-]{1,80}$")

_EXTENSIONS = {
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/jpg": ".jpg",
    "image/webp": ".webp",
    "image/gif": ".gif",
    "image/bmp": ".bmp",
}

_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", ".png"),
    (b"\xff\xd8\xff", ".jpg"),
    (b"GIF8", ".gif"),
    (b"BM", ".bmp"),
)


class NotAnImage(ValueError):
    """The API returned bytes that are not a browser-displayable image."""


def image_extension(content: bytes, content_type: str) -> str:
    """Pick a file extension from the declared content type, or else from the magic bytes."""
    ext = _EXTENSIONS.get(content_type.lower())
    if ext is not None:
        return ext
    for magic, magic_ext in _MAGIC:
        if content.startswith(magic):
            return magic_ext
    if content[:4] == b"RIFF" and content[8:12] == b"WEBP":
        return ".webp"
    raise NotAnImage(f"the API returned {content_type or 'unknown content'}, not an image")


class ImageStore:
    """Files named after image ids under ``root``; at most ``max_files``, least recent evicted."""

    def __init__(self, root: str | os.PathLike[str], max_files: int = 4096) -> None:
        if max_files < 16:
            raise ValueError("max_files must be at least 16")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_files = max_files
        self._lock = threading.Lock()

    def _stem(self, image_id: str) -> str:
        if _SAFE_ID.match(image_id):
            return image_id
        return hashlib.sha256(image_id.encode("utf-8")).hexdigest()[:40]

    def _existing(self, stem: str) -> Path | None:
        for ext in set(_EXTENSIONS.values()):
            candidate = self.root / f"{stem}{ext}"
            if candidate.is_file():
                return candidate
        return None

    def get(self, image_id: str, fetch: Callable[[], tuple[bytes, str]]) -> str:
        """Return a local path for ``image_id``, calling ``fetch()`` -> (bytes, type) if needed."""
        stem = self._stem(image_id)
        existing = self._existing(stem)
        if existing is not None:
            try:
                os.utime(existing)  # mark as recently used for eviction
            except FileNotFoundError:
                existing = None
            else:
                return str(existing)
        content, content_type = fetch()
        if not content:
            raise NotAnImage("the API returned an empty image")
        path = self.root / f"{stem}{image_extension(content, content_type)}"
        atomic_write(path, content, durable=False)  # a cache: atomic, not fsynced
        self._evict()
        return str(path)

    def _evict(self) -> None:
        with self._lock:
            files = [p for p in self.root.iterdir() if p.is_file() and not p.name.startswith(".")]
            if len(files) <= self.max_files:
                return
            keep = int(self.max_files * 0.8)

            def mtime(p: Path) -> float:
                try:
                    return p.stat().st_mtime
                except FileNotFoundError:
                    return 0.0

            files.sort(key=mtime)
            for old in files[: len(files) - keep]:
                old.unlink(missing_ok=True)
