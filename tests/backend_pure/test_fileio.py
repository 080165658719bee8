"""backend.fileio.atomic_write: the one atomic file write (temp file, fsync, rename)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from backend.fileio import atomic_write


def test_writes_bytes_and_streams_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b.bin"
    atomic_write(target, b"one")
    assert target.read_bytes() == b"one"
    atomic_write(target, io.BytesIO(b"two" * 1_000_000))
    assert target.read_bytes() == b"two" * 1_000_000
    atomic_write(target, b"three", durable=False)
    assert target.read_bytes() == b"three"
    assert [p.name for p in target.parent.iterdir()] == ["b.bin"]


def test_a_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old")

    class Broken(io.RawIOBase):
        def readinto(self, b: object) -> int:
            raise OSError("disk went away")

    with pytest.raises(OSError, match="disk went away"):
        atomic_write(target, Broken())  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]
