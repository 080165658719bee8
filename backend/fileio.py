"""The atomic file write, written once: temporary file beside the target, fsync, rename, fsync
the directory. A reader (or a crash) sees either the old file or the whole new one, never part.

Torch-free, so the API, the UI and the workers all use it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO


def fsync_dir(path: str | Path) -> None:
    """Make a rename or a new entry in ``path`` durable (best effort where directories cannot
    be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, data: bytes | BinaryIO, *, durable: bool = True) -> Path:
    """Write ``data`` (bytes, or a binary file object copied in 1 MiB chunks) to ``path``
    atomically; returns ``path``. ``durable=False`` skips both fsyncs (a cache that can be
    rebuilt), keeping the atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            if isinstance(data, bytes | bytearray | memoryview):
                out.write(data)
            else:
                shutil.copyfileobj(data, out, 1 << 20)
            if durable:
                out.flush()
                os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)
    return path


__all__ = ["atomic_write", "fsync_dir"]
