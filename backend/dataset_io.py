"""Dataset export to, and import from, Pick-a-Pic's schema.

Pure functions (pyarrow + Pillow) that the API layer calls; they never touch the database.

Labels
    A vote becomes a pair of labels ``(label_0, label_1)``: image 0 preferred is ``(1, 0)``,
    image 1 preferred is ``(0, 1)``, a tie is ``(0.5, 0.5)``, and "both bad" is ``(0, 0)``
    (see :func:`labels_for_choice`).

Parquet export (:func:`write_pickapic_parquet`)
    Columns, in this order: ``caption, jpg_0, jpg_1, label_0, label_1, model_0, model_1,
    best_image_uid, has_label, are_different, user_id, ranking_id, created_at, image_0_uid,
    image_1_uid`` (see :data:`PICKAPIC_SCHEMA` for the types).

    * ``jpg_0`` / ``jpg_1`` hold JPEG bytes, as in Pick-a-Pic: JPEG input is kept byte for
      byte, anything else (PNG from the generators) is re-encoded with Pillow as RGB JPEG,
      quality 95.
    * Ties are kept: ``label_0 = label_1 = 0.5``, ``has_label = True``, ``best_image_uid = ""``.
    * "Both bad" votes are **left out** by default. Pick-a-Pic has no such label, and the
      Diffusion-DPO training script treats any row with ``label_0 == 0`` as "image 1 wins",
      so a ``(0, 0)`` row would silently become a wrong preference. With
      ``include_both_bad=True`` they are written as ``label_0 = label_1 = 0``,
      ``has_label = False``, ``best_image_uid = ""``.
    * ``are_different`` compares the two images' source bytes.
    * ``created_at`` is a UTC timestamp (microseconds); naive datetimes are taken as UTC.

JSONL export (:func:`export_jsonl_lines`)
    One JSON object per line with the same fields as the parquet export **except the image
    bytes**: images are referred to by ``image_0_uid`` / ``image_1_uid``. ``created_at`` is an
    ISO-8601 string. All records are written, "both bad" included (``has_label = false``).

Parquet import (:func:`open_pickapic_parquet`, :func:`read_pickapic_parquet`)
    Required columns: ``caption, jpg_0, jpg_1, label_0, label_1``. Optional: ``model_0,
    model_1`` (missing or null become ``""``), ``user_id`` (missing or null become ``None``),
    ``has_label`` (rows where it is false carry no preference and are skipped), and
    ``ranking_id``, ``created_at``, ``image_0_uid``, ``image_1_uid``, which an import keeps so
    that its export gives them back (the round trip is lossless for imported rows). Every row
    read is validated (labels, images decodable by Pillow, caption present) before it is
    returned. :func:`open_pickapic_parquet` streams: it reads the file (bytes, a path or a
    file object, never copied whole) row group by row group, at most ``IMPORT_BATCH_ROWS``
    rows of images decoded at a time, reporting progress (:class:`ImportProgress`) and the
    rows read. A caller that writes as it reads (``backend.services.datasets.import_pairs``)
    does so in one transaction and rolls it back on the first bad row, so that a file writes
    all its rows or none.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

#: Allowed ``(label_0, label_1)`` values on export.
EXPORT_LABELS = {(1.0, 0.0), (0.0, 1.0), (0.5, 0.5), (0.0, 0.0)}
#: Allowed ``(label_0, label_1)`` values on import (rows with a preference or a tie).
IMPORT_LABELS = {(1.0, 0.0), (0.0, 1.0), (0.5, 0.5)}

REQUIRED_IMPORT_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")

PICKAPIC_SCHEMA = pa.schema(
    [
        ("caption", pa.string()),
        ("jpg_0", pa.binary()),
        ("jpg_1", pa.binary()),
        ("label_0", pa.float64()),
        ("label_1", pa.float64()),
        ("model_0", pa.string()),
        ("model_1", pa.string()),
        ("best_image_uid", pa.string()),
        ("has_label", pa.bool_()),
        ("are_different", pa.bool_()),
        ("user_id", pa.int64()),
        ("ranking_id", pa.int64()),
        ("created_at", pa.timestamp("us", tz="UTC")),
        ("image_0_uid", pa.string()),
        ("image_1_uid", pa.string()),
    ]
)

_JPEG_MAGIC = b"\xff\xd8\xff"
_JPEG_QUALITY = 95


class DatasetFormatError(ValueError):
    """The uploaded file is not a usable Pick-a-Pic parquet file; the message says why."""


def labels_for_choice(choice: str) -> tuple[float, float]:
    """``(label_0, label_1)`` for a vote choice: ``"a"`` (image 0 preferred), ``"b"``
    (image 1 preferred), ``"tie"`` or ``"both_bad"``."""
    try:
        return {"a": (1.0, 0.0), "b": (0.0, 1.0), "tie": (0.5, 0.5), "both_bad": (0.0, 0.0)}[choice]
    except KeyError:
        raise ValueError(f"unknown choice {choice!r}") from None


@dataclass(frozen=True)
class ExportRecord:
    """One annotated pair to export. ``image_0`` / ``image_1`` are encoded image bytes
    (PNG or JPEG); labels follow :func:`labels_for_choice`."""

    caption: str
    image_0: bytes
    image_1: bytes
    image_0_uid: str
    image_1_uid: str
    label_0: float
    label_1: float
    model_0: str
    model_1: str
    user_id: int
    ranking_id: int
    created_at: datetime


@dataclass(frozen=True)
class ImportedPair:
    """One validated pair read from a Pick-a-Pic parquet file (images as stored: JPEG bytes
    in Pick-a-Pic)."""

    caption: str
    image_0: bytes
    image_1: bytes
    label_0: float
    label_1: float
    model_0: str
    model_1: str
    user_id: int | None
    ranking_id: int | None = None
    created_at: datetime | None = None
    image_0_uid: str | None = None
    image_1_uid: str | None = None
    #: 0-based row of the file it came from (-1: not read from a file).
    row: int = field(default=-1, compare=False)


#: Longest image uid an import keeps (``images.external_uid``).
MAX_IMAGE_UID_CHARS = 128


def _check_labels(rec: ExportRecord) -> tuple[float, float]:
    labels = (float(rec.label_0), float(rec.label_1))
    if labels not in EXPORT_LABELS:
        raise ValueError(
            f"record ranking_id={rec.ranking_id}: labels {labels} are not one of "
            f"{sorted(EXPORT_LABELS)}"
        )
    return labels


def _best_uid(rec: ExportRecord, labels: tuple[float, float]) -> str:
    if labels == (1.0, 0.0):
        return rec.image_0_uid
    if labels == (0.0, 1.0):
        return rec.image_1_uid
    return ""


def _utc(ts: datetime) -> datetime:
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def to_jpeg(data: bytes) -> bytes:
    """JPEG bytes for an encoded image: JPEG is returned unchanged, anything else Pillow can
    read is converted to RGB and encoded at quality 95."""
    if data[:3] == _JPEG_MAGIC:
        return data
    with Image.open(io.BytesIO(data)) as img:
        if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            rgb = Image.new("RGB", rgba.size, (255, 255, 255))
            rgb.paste(rgba, mask=rgba.getchannel("A"))
        else:
            rgb = img.convert("RGB")
        out = io.BytesIO()
        rgb.save(out, format="JPEG", quality=_JPEG_QUALITY)
        return out.getvalue()


def write_pickapic_parquet(
    records: Iterable[ExportRecord],
    fileobj: IO[bytes] | str,
    *,
    row_group_size: int = 256,
    include_both_bad: bool = False,
) -> int:
    """Write ``records`` as a Pick-a-Pic parquet file; returns the number of rows written.

    ``fileobj`` is a writable binary file object (or a path). Records are consumed lazily and
    written ``row_group_size`` rows at a time, so at most one row group of images is held in
    memory. A file with the full schema and zero rows is written when there is nothing to
    export. A record with labels outside :data:`EXPORT_LABELS`, or with image bytes Pillow
    cannot read, raises ``ValueError`` naming its ``ranking_id`` (rows already flushed stay
    in ``fileobj``; the caller discards the partial output).
    "Both bad" records ``(0, 0)`` are skipped unless ``include_both_bad`` (see module doc).
    """
    if row_group_size < 1:
        raise ValueError("row_group_size must be >= 1")
    names = PICKAPIC_SCHEMA.names
    written = 0
    with pq.ParquetWriter(fileobj, PICKAPIC_SCHEMA) as writer:
        batch: dict[str, list] = {name: [] for name in names}

        def flush() -> None:
            if batch["caption"]:
                table = pa.Table.from_pydict(batch, schema=PICKAPIC_SCHEMA)
                writer.write_table(table, row_group_size=row_group_size)
                for col in batch.values():
                    col.clear()

        for rec in records:
            labels = _check_labels(rec)
            both_bad = labels == (0.0, 0.0)
            if both_bad and not include_both_bad:
                continue
            batch["caption"].append(rec.caption)
            try:
                jpg_0, jpg_1 = to_jpeg(rec.image_0), to_jpeg(rec.image_1)
            except Exception as exc:  # Pillow raises several types for unreadable data
                raise ValueError(
                    f"record ranking_id={rec.ranking_id}: image is not readable ({exc})"
                ) from exc
            batch["jpg_0"].append(jpg_0)
            batch["jpg_1"].append(jpg_1)
            batch["label_0"].append(labels[0])
            batch["label_1"].append(labels[1])
            batch["model_0"].append(rec.model_0)
            batch["model_1"].append(rec.model_1)
            batch["best_image_uid"].append(_best_uid(rec, labels))
            batch["has_label"].append(not both_bad)
            batch["are_different"].append(rec.image_0 != rec.image_1)
            batch["user_id"].append(rec.user_id)
            batch["ranking_id"].append(rec.ranking_id)
            batch["created_at"].append(_utc(rec.created_at))
            batch["image_0_uid"].append(rec.image_0_uid)
            batch["image_1_uid"].append(rec.image_1_uid)
            written += 1
            if len(batch["caption"]) >= row_group_size:
                flush()
        flush()
    return written


def export_jsonl_lines(records: Iterable[ExportRecord]) -> Iterator[str]:
    """One JSON object per record, each string ending in ``"\\n"``; no image bytes.

    Keys: ``caption, image_0_uid, image_1_uid, label_0, label_1, model_0, model_1,
    best_image_uid, has_label, are_different, user_id, ranking_id, created_at`` (ISO 8601,
    UTC). ``are_different`` compares the image bytes. Every record is emitted, "both bad"
    included.
    """
    for rec in records:
        labels = _check_labels(rec)
        obj = {
            "caption": rec.caption,
            "image_0_uid": rec.image_0_uid,
            "image_1_uid": rec.image_1_uid,
            "label_0": labels[0],
            "label_1": labels[1],
            "model_0": rec.model_0,
            "model_1": rec.model_1,
            "best_image_uid": _best_uid(rec, labels),
            "has_label": labels != (0.0, 0.0),
            "are_different": rec.image_0 != rec.image_1,
            "user_id": rec.user_id,
            "ranking_id": rec.ranking_id,
            "created_at": _utc(rec.created_at).isoformat(),
        }
        yield json.dumps(obj, ensure_ascii=False) + "\n"


def _image_bytes(value: object) -> bytes | None:
    """Bytes of an image cell: plain binary, or a Hugging Face image struct ``{bytes, path}``."""
    if isinstance(value, dict):
        value = value.get("bytes")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    return None


def _check_image(data: bytes | None, row: int, column: str) -> bytes:
    if not data:
        raise DatasetFormatError(f"row {row}: column {column!r} holds no image bytes")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
    except Exception as exc:  # Pillow raises many types for corrupt data
        raise DatasetFormatError(
            f"row {row}: column {column!r} is not a decodable image ({exc})"
        ) from None
    return data


def _label(value: object, row: int, column: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DatasetFormatError(f"row {row}: {column} must be a number, got {value!r}")
    x = float(value)
    if not math.isfinite(x):
        raise DatasetFormatError(f"row {row}: {column} must be finite, got {x!r}")
    return x


#: Rows decoded at a time inside a row group: bounds the image bytes held in memory whatever
#: the file's row group size.
IMPORT_BATCH_ROWS = 256

_OPTIONAL_IMPORT_COLUMNS = (
    "model_0",
    "model_1",
    "user_id",
    "has_label",
    "ranking_id",
    "created_at",
    "image_0_uid",
    "image_1_uid",
)

#: What an import reads: the bytes of a file, a path, or a seekable binary file object.
ParquetSource = bytes | bytearray | memoryview | str | os.PathLike | IO[bytes]
#: ``progress(rows_read, rows_in_file)``, called after each batch of rows.
Progress = Callable[[int, int], None]


def _int_cell(value: object, row: int, column: str) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise DatasetFormatError(f"row {row}: {column} must be an integer, got {value!r}")
    return value


def _row_pair(cols: dict[str, list], j: int, r: int) -> ImportedPair:
    """Row ``j`` of a decoded batch (file row ``r``), validated."""
    caption = cols["caption"][j]
    if not isinstance(caption, str):
        raise DatasetFormatError(f"row {r}: caption must be a string, got {caption!r}")
    labels = (
        _label(cols["label_0"][j], r, "label_0"),
        _label(cols["label_1"][j], r, "label_1"),
    )
    if labels not in IMPORT_LABELS:
        raise DatasetFormatError(
            f"row {r}: (label_0, label_1) = {labels} is not one of (1, 0), (0, 1), (0.5, 0.5)"
        )
    img0 = _check_image(_image_bytes(cols["jpg_0"][j]), r, "jpg_0")
    img1 = _check_image(_image_bytes(cols["jpg_1"][j]), r, "jpg_1")
    user_id = _int_cell(cols["user_id"][j] if "user_id" in cols else None, r, "user_id")
    ranking_id = _int_cell(cols["ranking_id"][j] if "ranking_id" in cols else None, r, "ranking_id")
    created_at = cols["created_at"][j] if "created_at" in cols else None
    if created_at is not None and not isinstance(created_at, datetime):
        raise DatasetFormatError(f"row {r}: created_at must be a timestamp, got {created_at!r}")
    uids = []
    for name in ("image_0_uid", "image_1_uid"):
        uid = cols[name][j] if name in cols else None
        if uid is not None and (
            not isinstance(uid, str) or len(uid) > MAX_IMAGE_UID_CHARS or "\x00" in uid
        ):
            raise DatasetFormatError(
                f"row {r}: {name} must be a string of at most "
                f"{MAX_IMAGE_UID_CHARS} characters, got {uid!r:.80}"
            )
        uids.append(uid or None)
    models = []
    for name in ("model_0", "model_1"):
        m = cols[name][j] if name in cols else None
        if m is not None and not isinstance(m, str):
            raise DatasetFormatError(f"row {r}: {name} must be a string, got {m!r}")
        models.append(m or "")
    return ImportedPair(
        caption=caption,
        image_0=img0,
        image_1=img1,
        label_0=labels[0],
        label_1=labels[1],
        model_0=models[0],
        model_1=models[1],
        user_id=user_id,
        ranking_id=ranking_id,
        created_at=(
            created_at.replace(tzinfo=UTC)
            if created_at is not None and created_at.tzinfo is None
            else created_at
        ),
        image_0_uid=uids[0],
        image_1_uid=uids[1],
        row=r,
    )


class PickapicReader:
    """A Pick-a-Pic parquet file, opened and its columns checked (:func:`open_pickapic_parquet`).

    :meth:`pairs` reads it row group by row group (``IMPORT_BATCH_ROWS`` rows decoded at a
    time), validating each row as it goes: at most one batch of images is in memory, whatever
    the file's size. ``num_rows`` / ``num_row_groups`` come from the file's footer;
    ``rows_read``, ``rows_unlabelled`` and ``row_groups_read`` count what :meth:`pairs` has
    read so far. Use it as a context manager (or call :meth:`close`) to release a file it
    opened from a path.
    """

    def __init__(self, source: ParquetSource) -> None:
        if isinstance(source, (bytes, bytearray, memoryview)):
            source = pa.BufferReader(pa.py_buffer(source))  # zero copy
        try:
            self._pf = pq.ParquetFile(source)
            schema = self._pf.schema_arrow
        except Exception as exc:
            raise DatasetFormatError(f"not a parquet file ({exc})") from None
        present = set(schema.names)
        missing = [c for c in REQUIRED_IMPORT_COLUMNS if c not in present]
        if missing:
            raise DatasetFormatError(
                "missing required column(s): "
                + ", ".join(missing)
                + f" (file has: {', '.join(schema.names) or 'no columns'})"
            )
        self.columns = list(REQUIRED_IMPORT_COLUMNS) + [
            c for c in _OPTIONAL_IMPORT_COLUMNS if c in present
        ]
        self.num_rows = int(self._pf.metadata.num_rows)
        self.num_row_groups = int(self._pf.num_row_groups)
        self.rows_read = 0
        self.rows_unlabelled = 0
        self.row_groups_read = 0

    def close(self) -> None:
        close = getattr(self._pf, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> PickapicReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def pairs(
        self, *, max_rows: int | None = None, progress: Progress | None = None
    ) -> Iterator[ImportedPair]:
        """The labelled pairs in file order, each validated before it is yielded; raises
        :class:`DatasetFormatError` at the first bad row (0-based file row and column named).
        Rows whose ``has_label`` is false are counted and skipped. Stops after ``max_rows``
        pairs (later rows are neither read nor validated). ``progress(rows_read, num_rows)``
        is called after each batch."""
        if max_rows is not None and max_rows < 0:
            raise ValueError("max_rows must be >= 0")
        if max_rows == 0:
            return
        made = 0
        row = self.rows_read
        try:
            for rg in range(self.row_groups_read, self.num_row_groups):
                batches = self._pf.iter_batches(
                    batch_size=IMPORT_BATCH_ROWS, row_groups=[rg], columns=self.columns
                )
                for batch in batches:
                    cols = {name: batch.column(name).to_pylist() for name in self.columns}
                    for j in range(batch.num_rows):
                        r = row + j
                        self.rows_read = r + 1
                        if "has_label" in cols and cols["has_label"][j] is False:
                            self.rows_unlabelled += 1
                            continue
                        yield _row_pair(cols, j, r)
                        made += 1
                        if max_rows is not None and made >= max_rows:
                            if progress is not None:
                                progress(self.rows_read, self.num_rows)
                            return
                    row += batch.num_rows
                    self.rows_read = row
                    if progress is not None:
                        progress(self.rows_read, self.num_rows)
                self.row_groups_read = rg + 1
        except DatasetFormatError:
            raise
        except Exception as exc:  # corrupt column chunks, unsupported encodings, ...
            raise DatasetFormatError(f"unreadable parquet data near row {row} ({exc})") from None


def open_pickapic_parquet(source: ParquetSource) -> PickapicReader:
    """Open a Pick-a-Pic parquet file (bytes, a path, or a seekable binary file object, which
    is read in place, never copied whole) and check its columns; raises
    :class:`DatasetFormatError` if it is not parquet or a required column is missing (see
    :data:`REQUIRED_IMPORT_COLUMNS`). Nothing else is read until :meth:`PickapicReader.pairs`.
    """
    return PickapicReader(source)


def read_pickapic_parquet(
    data: ParquetSource, *, max_rows: int | None = None
) -> list[ImportedPair]:
    """Parse and fully validate a Pick-a-Pic parquet file: all its labelled pairs as a list.

    Returns the labelled pairs in file order; raises :class:`DatasetFormatError` (with the
    missing column names, or the 0-based row index and column of the first bad value) if the
    bytes are not parquet, a required column is missing (see :data:`REQUIRED_IMPORT_COLUMNS`),
    a caption is null, a label pair is not one of ``(1, 0)``, ``(0, 1)``, ``(0.5, 0.5)``, or
    an image cannot be decoded by Pillow. Rows whose ``has_label`` column is false are
    skipped. ``max_rows`` caps the number of pairs returned (reading stops there; rows after
    it are neither read nor validated). A file with no labelled rows gives ``[]``. Holds every
    pair in memory: an import streams with :func:`open_pickapic_parquet` instead.
    """
    if max_rows is not None and max_rows < 0:
        raise ValueError("max_rows must be >= 0")
    with open_pickapic_parquet(data) as reader:
        return list(reader.pairs(max_rows=max_rows))


class ImportProgress:
    """A progress callback for :meth:`PickapicReader.pairs`: a tqdm bar on an interactive
    terminal (when tqdm is installed), otherwise a log line at most every ``every_s`` seconds
    and at the end (the API server's case)."""

    def __init__(
        self,
        desc: str = "import",
        *,
        logger: logging.Logger | None = None,
        every_s: float = 5.0,
        bar: bool | None = None,
    ) -> None:
        self.desc = desc
        self.log = logger or logging.getLogger(__name__)
        self.every_s = every_s
        self._bar: Any = None
        self._want_bar = sys.stderr.isatty() if bar is None else bar
        self._last = float("-inf")
        self.done = 0
        self.total = 0

    def __call__(self, done: int, total: int) -> None:
        self.done, self.total = done, total
        if self._want_bar and self._bar is None:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                self._want_bar = False
            else:
                self._bar = tqdm(total=total, desc=self.desc, unit="row")
        if self._bar is not None:
            self._bar.update(done - self._bar.n)
            return
        now = time.monotonic()
        if done >= total or now - self._last >= self.every_s:
            self._last = now
            pct = 100.0 * done / total if total else 100.0
            self.log.info("%s: %d/%d rows read (%.0f%%)", self.desc, done, total, pct)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> ImportProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
