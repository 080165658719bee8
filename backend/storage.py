"""Content-addressed image files under ``<data_dir>/images``.

Files are written once (temp file + atomic rename) at ``ab/cd/<sha256>.<ext>`` and never
modified, which is what lets ``GET /images/{id}`` answer with ``Cache-Control: immutable``.
:meth:`ImageStore.resolve` refuses any stored path that escapes the root, so a bad row can
never make the server read another file.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from backend.fileio import atomic_write

MEDIA_EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}


def sniff_media_type(data: bytes) -> str | None:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


class UnsafePath(ValueError):
    pass


class ImageStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    def save(
        self,
        data: bytes,
        media_type: str,
        *,
        on_create: Callable[[Path, str], None] | None = None,
    ) -> tuple[str, str]:
        """Store ``data``; returns ``(relative_path, sha256)``. Idempotent per content.
        ``on_create(path, relative_path)`` is called when this call created the file (see
        :mod:`backend.staging`)."""
        ext = MEDIA_EXTENSIONS.get(media_type)
        if ext is None:
            raise ValueError(f"unsupported image type {media_type!r}")
        digest = hashlib.sha256(data).hexdigest()
        rel = f"{digest[:2]}/{digest[2:4]}/{digest}.{ext}"
        path = self.root / rel
        if not path.exists():
            atomic_write(path, data)
            if on_create is not None:
                on_create(path, rel)
        return rel, digest

    def resolve(self, rel: str) -> Path:
        """The absolute path of a stored file; raises :class:`UnsafePath` outside the root."""
        if not rel or "\x00" in rel or os.path.isabs(rel):
            raise UnsafePath(rel)
        path = (self.root / rel).resolve()
        if not path.is_relative_to(self.root):
            raise UnsafePath(rel)
        return path

    def read(self, rel: str) -> bytes:
        return self.resolve(rel).read_bytes()
