"""Pick-a-Pic parquet / JSONL export and parquet import."""

import io
import json
from datetime import UTC, datetime, timedelta, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from backend.dataset_io import (
    DatasetFormatError,
    ExportRecord,
    ImportedPair,
    export_jsonl_lines,
    labels_for_choice,
    read_pickapic_parquet,
    to_jpeg,
    write_pickapic_parquet,
)

PICKAPIC_COLUMNS = [
    "caption",
    "jpg_0",
    "jpg_1",
    "label_0",
    "label_1",
    "model_0",
    "model_1",
    "best_image_uid",
    "has_label",
    "are_different",
    "user_id",
    "ranking_id",
    "created_at",
    "image_0_uid",
    "image_1_uid",
]


def _png(color, size=(8, 6), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(color, size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


RED, BLUE = _png((255, 0, 0)), _png((0, 0, 255))
T0 = datetime(2024, 5, 1, 12, 30, tzinfo=UTC)


def _rec(i: int, choice: str, img0=RED, img1=BLUE, **kw) -> ExportRecord:
    l0, l1 = labels_for_choice(choice)
    fields = dict(
        caption=f"a small red circle #{i}",
        image_0=img0,
        image_1=img1,
        image_0_uid=f"u{i}-0",
        image_1_uid=f"u{i}-1",
        label_0=l0,
        label_1=l1,
        model_0="v1",
        model_1="v2",
        user_id=100 + i,
        ranking_id=1000 + i,
        created_at=T0 + timedelta(minutes=i),
    )
    fields.update(kw)
    return ExportRecord(**fields)


def _export(records, **kw) -> tuple[int, bytes]:
    buf = io.BytesIO()
    n = write_pickapic_parquet(records, buf, **kw)
    return n, buf.getvalue()


def _parquet(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _valid_table(n=3, **overrides) -> dict:
    cols = {
        "caption": [f"c{i}" for i in range(n)],
        "jpg_0": [_jpeg((200, 0, 0))] * n,
        "jpg_1": [_jpeg((0, 0, 200))] * n,
        "label_0": [1.0] * n,
        "label_1": [0.0] * n,
    }
    cols.update(overrides)
    return cols


def test_labels_for_choice():
    assert labels_for_choice("a") == (1.0, 0.0)
    assert labels_for_choice("b") == (0.0, 1.0)
    assert labels_for_choice("tie") == (0.5, 0.5)
    assert labels_for_choice("both_bad") == (0.0, 0.0)
    with pytest.raises(ValueError, match="unknown choice"):
        labels_for_choice("c")


def test_export_schema_and_values():
    records = [
        _rec(0, "a"),
        _rec(1, "b"),
        _rec(2, "tie"),
        _rec(3, "both_bad"),
        _rec(4, "a", img1=RED),
    ]
    n, data = _export(records)
    assert n == 4  # both_bad left out
    table = pq.read_table(io.BytesIO(data))
    assert table.column_names == PICKAPIC_COLUMNS
    rows = table.to_pylist()
    assert [r["caption"] for r in rows] == [
        "a small red circle #0",
        "a small red circle #1",
        "a small red circle #2",
        "a small red circle #4",
    ]
    assert [(r["label_0"], r["label_1"]) for r in rows] == [(1, 0), (0, 1), (0.5, 0.5), (1, 0)]
    assert [r["best_image_uid"] for r in rows] == ["u0-0", "u1-1", "", "u4-0"]
    assert [r["has_label"] for r in rows] == [True] * 4
    assert [r["are_different"] for r in rows] == [True, True, True, False]
    assert [r["user_id"] for r in rows] == [100, 101, 102, 104]
    assert [r["ranking_id"] for r in rows] == [1000, 1001, 1002, 1004]
    assert rows[0]["created_at"] == T0
    assert (rows[0]["image_0_uid"], rows[0]["image_1_uid"]) == ("u0-0", "u0-1")
    assert (rows[0]["model_0"], rows[0]["model_1"]) == ("v1", "v2")
    # PNG input is re-encoded to JPEG that decodes to (almost) the same colour.
    jpg = rows[0]["jpg_0"]
    assert jpg[:3] == b"\xff\xd8\xff"
    with Image.open(io.BytesIO(jpg)) as img:
        assert img.format == "JPEG" and img.size == (8, 6)
        r, g, b = img.convert("RGB").getpixel((3, 3))
        assert r > 240 and g < 15 and b < 15


def test_both_bad_included_on_request():
    n, data = _export([_rec(0, "both_bad"), _rec(1, "a")], include_both_bad=True)
    assert n == 2
    rows = pq.read_table(io.BytesIO(data)).to_pylist()
    assert (rows[0]["label_0"], rows[0]["label_1"], rows[0]["has_label"]) == (0, 0, False)
    assert rows[0]["best_image_uid"] == ""
    # On import the unlabelled row is skipped.
    pairs = read_pickapic_parquet(data)
    assert [p.caption for p in pairs] == ["a small red circle #1"]


def test_round_trip_export_import():
    records = [_rec(0, "a"), _rec(1, "tie"), _rec(2, "b", img0=_jpeg((0, 255, 0)))]
    n, data = _export(records)
    assert n == 3
    pairs = read_pickapic_parquet(data)
    assert len(pairs) == 3
    for rec, pair in zip(records, pairs, strict=True):
        assert isinstance(pair, ImportedPair)
        assert pair.caption == rec.caption
        assert (pair.label_0, pair.label_1) == (rec.label_0, rec.label_1)
        assert (pair.model_0, pair.model_1) == (rec.model_0, rec.model_1)
        assert pair.user_id == rec.user_id
        for raw in (pair.image_0, pair.image_1):
            with Image.open(io.BytesIO(raw)) as img:
                img.load()
                assert img.format == "JPEG"
    # Tie survives: 0.5 / 0.5.
    assert (pairs[1].label_0, pairs[1].label_1) == (0.5, 0.5)
    # JPEG input is kept byte for byte.
    assert pairs[2].image_0 == records[2].image_0


def test_row_groups_bound_memory_and_generator_input():
    def gen():
        for i in range(10):
            yield _rec(i, "a" if i % 2 else "b")

    n, data = _export(gen(), row_group_size=4)
    assert n == 10
    meta = pq.ParquetFile(io.BytesIO(data)).metadata
    assert meta.num_rows == 10
    assert meta.num_row_groups == 3
    assert [meta.row_group(i).num_rows for i in range(3)] == [4, 4, 2]


def test_empty_export_is_a_valid_file():
    n, data = _export([])
    assert n == 0
    table = pq.read_table(io.BytesIO(data))
    assert table.num_rows == 0 and table.column_names == PICKAPIC_COLUMNS
    assert read_pickapic_parquet(data) == []


def test_export_rejects_bad_labels():
    with pytest.raises(ValueError, match="ranking_id=1007"):
        _export([_rec(7, "a", label_0=0.7, label_1=0.3)])


def test_export_rejects_unreadable_image():
    with pytest.raises(ValueError, match="ranking_id=1003: image is not readable"):
        _export([_rec(3, "a", img1=b"garbage")])


def test_to_jpeg_handles_alpha_and_palette():
    rgba = _png((0, 255, 0, 0), mode="RGBA")  # fully transparent -> white background
    with Image.open(io.BytesIO(to_jpeg(rgba))) as img:
        assert img.mode == "RGB"
        assert min(img.getpixel((2, 2))) > 240
    pal = Image.new("P", (4, 4), 3)
    buf = io.BytesIO()
    pal.save(buf, format="PNG")
    assert to_jpeg(buf.getvalue())[:3] == b"\xff\xd8\xff"


def test_jsonl_export():
    naive = datetime(2024, 1, 2, 3, 4, 5)  # taken as UTC
    other_tz = datetime(2024, 1, 2, 5, 4, 5, tzinfo=timezone(timedelta(hours=2)))
    records = [
        _rec(0, "a", created_at=naive),
        _rec(1, "tie", created_at=other_tz),
        _rec(2, "both_bad", img1=RED),
    ]
    lines = list(export_jsonl_lines(records))
    assert len(lines) == 3 and all(line.endswith("\n") and line.count("\n") == 1 for line in lines)
    objs = [json.loads(line) for line in lines]
    assert set(objs[0]) == {
        "caption",
        "image_0_uid",
        "image_1_uid",
        "label_0",
        "label_1",
        "model_0",
        "model_1",
        "best_image_uid",
        "has_label",
        "are_different",
        "user_id",
        "ranking_id",
        "created_at",
    }
    assert objs[0]["best_image_uid"] == "u0-0" and objs[0]["has_label"] is True
    assert objs[0]["created_at"] == "2024-01-02T03:04:05+00:00"
    assert objs[1]["created_at"] == "2024-01-02T03:04:05+00:00"
    assert (objs[1]["label_0"], objs[1]["label_1"], objs[1]["best_image_uid"]) == (0.5, 0.5, "")
    assert (objs[2]["label_0"], objs[2]["label_1"], objs[2]["has_label"]) == (0, 0, False)
    assert objs[2]["are_different"] is False
    assert list(export_jsonl_lines([])) == []


def test_import_minimal_columns_defaults():
    pairs = read_pickapic_parquet(_parquet(pa.table(_valid_table(2))))
    assert [(p.caption, p.model_0, p.model_1, p.user_id) for p in pairs] == [
        ("c0", "", "", None),
        ("c1", "", "", None),
    ]


def test_import_accepts_large_binary_and_hf_image_structs():
    cols = _valid_table(2)
    table = pa.table(
        {
            "caption": cols["caption"],
            "jpg_0": pa.array(cols["jpg_0"], type=pa.large_binary()),
            "jpg_1": pa.array([{"bytes": b, "path": None} for b in cols["jpg_1"]]),
            "label_0": cols["label_0"],
            "label_1": cols["label_1"],
            "user_id": pa.array([5, None], type=pa.int64()),
        }
    )
    pairs = read_pickapic_parquet(_parquet(table))
    assert pairs[1].image_1 == cols["jpg_1"][1]
    assert [p.user_id for p in pairs] == [5, None]


def test_import_missing_columns_are_named():
    cols = _valid_table(2)
    del cols["label_1"], cols["jpg_1"]
    with pytest.raises(DatasetFormatError, match=r"missing required column\(s\): jpg_1, label_1"):
        read_pickapic_parquet(_parquet(pa.table(cols)))


def test_import_garbage_is_not_parquet():
    for garbage in (b"", b"hello world", b"PAR1" + b"\x00" * 64, _jpeg((1, 2, 3))):
        with pytest.raises(DatasetFormatError, match="not a parquet file"):
            read_pickapic_parquet(garbage)
    assert issubclass(DatasetFormatError, ValueError)


@pytest.mark.parametrize(
    ("labels_0", "labels_1", "message"),
    [
        ([1.0, 0.0, 0.7], [0.0, 1.0, 0.3], r"row 2: \(label_0, label_1\) = \(0.7, 0.3\)"),
        ([1.0, None, 1.0], [0.0, 1.0, 0.0], r"row 1: label_0 must be a number"),
        ([1.0, 0.0, float("nan")], [0.0, 1.0, 0.0], r"row 2: label_0 must be finite"),
        ([0.0, 0.0, 1.0], [1.0, 0.0, 0.0], r"row 1: .* is not one of"),
    ],
)
def test_import_bad_labels_name_the_row(labels_0, labels_1, message):
    table = pa.table(_valid_table(3, label_0=labels_0, label_1=labels_1))
    with pytest.raises(DatasetFormatError, match=message):
        read_pickapic_parquet(_parquet(table))


def test_import_undecodable_image_names_row_and_column():
    good = _jpeg((9, 9, 9))
    truncated = good[: len(good) // 2]
    table = pa.table(_valid_table(3, jpg_1=[good, truncated, good]))
    with pytest.raises(DatasetFormatError, match=r"row 1: column 'jpg_1' is not a decodable image"):
        read_pickapic_parquet(_parquet(table))
    table = pa.table(_valid_table(2, jpg_0=[good, None]))
    with pytest.raises(DatasetFormatError, match=r"row 1: column 'jpg_0' holds no image bytes"):
        read_pickapic_parquet(_parquet(table))
    table = pa.table(_valid_table(1, jpg_0=[b"not an image"]))
    with pytest.raises(DatasetFormatError, match=r"row 0: column 'jpg_0'"):
        read_pickapic_parquet(_parquet(table))


def test_import_bad_caption_and_types():
    with pytest.raises(DatasetFormatError, match="row 0: caption"):
        read_pickapic_parquet(_parquet(pa.table(_valid_table(1, caption=[None]))))
    with pytest.raises(DatasetFormatError, match="row 0: user_id must be an integer, got '7'"):
        read_pickapic_parquet(_parquet(pa.table(_valid_table(2, user_id=["7", "x"]))))
    with pytest.raises(DatasetFormatError, match="row 0: model_1 must be a string"):
        read_pickapic_parquet(_parquet(pa.table(_valid_table(1, model_0=["m"], model_1=[3]))))


def test_import_max_rows_and_has_label():
    n, data = _export([_rec(i, "a") for i in range(5)])
    assert [p.caption[-2:] for p in read_pickapic_parquet(data, max_rows=2)] == ["#0", "#1"]
    assert len(read_pickapic_parquet(data, max_rows=50)) == 5
    assert read_pickapic_parquet(data, max_rows=0) == []
    with pytest.raises(ValueError, match="max_rows"):
        read_pickapic_parquet(data, max_rows=-1)
    # Rows beyond max_rows are not read, so a bad row there does not fail the import.
    table = pa.table(_valid_table(3, label_0=[1.0, 1.0, 0.3]))
    assert len(read_pickapic_parquet(_parquet(table), max_rows=2)) == 2
    # has_label = False rows are skipped and do not count toward max_rows.
    table = pa.table(_valid_table(3, has_label=[False, True, True], label_0=[0.0, 1.0, 1.0]))
    pairs = read_pickapic_parquet(_parquet(table), max_rows=2)
    assert [p.caption for p in pairs] == ["c1", "c2"]


# ---------------------------------------------------------------------------- streaming
def _multi_group(n=10, row_group_size=3, **overrides) -> bytes:
    """A parquet file of ``n`` rows in row groups of ``row_group_size`` (pyarrow, here)."""
    buf = io.BytesIO()
    pq.write_table(pa.table(_valid_table(n, **overrides)), buf, row_group_size=row_group_size)
    return buf.getvalue()


def test_streaming_reads_every_row_group_and_reports_progress(tmp_path):
    from backend.dataset_io import open_pickapic_parquet

    data = _multi_group(10, 3)  # row groups of 3, 3, 3, 1
    assert pq.ParquetFile(io.BytesIO(data)).num_row_groups == 4
    calls = []
    with open_pickapic_parquet(data) as reader:
        assert (reader.num_rows, reader.num_row_groups, reader.rows_read) == (10, 4, 0)
        pairs = list(reader.pairs(progress=lambda done, total: calls.append((done, total))))
        assert [p.caption for p in pairs] == [f"c{i}" for i in range(10)]
        assert [p.row for p in pairs] == list(range(10))
        assert (reader.rows_read, reader.row_groups_read, reader.rows_unlabelled) == (10, 4, 0)
    # one call per batch; a batch never crosses a row group
    assert calls == [(3, 10), (6, 10), (9, 10), (10, 10)]
    # the same from a path and from an open file object
    path = tmp_path / "pap.parquet"
    path.write_bytes(data)
    assert read_pickapic_parquet(str(path)) == pairs
    with path.open("rb") as fh:
        assert read_pickapic_parquet(fh) == pairs


def test_streaming_batches_inside_a_large_row_group(monkeypatch):
    import backend.dataset_io as dio

    monkeypatch.setattr(dio, "IMPORT_BATCH_ROWS", 4)
    calls = []
    with dio.open_pickapic_parquet(_multi_group(10, 10)) as reader:
        assert reader.num_row_groups == 1
        assert len(list(reader.pairs(progress=lambda d, t: calls.append(d)))) == 10
    assert calls == [4, 8, 10]


def test_streaming_bad_row_in_the_last_row_group_is_named():
    from backend.dataset_io import open_pickapic_parquet

    labels = [1.0] * 9 + [0.3]  # row 9: alone in the 4th row group
    seen = []
    with open_pickapic_parquet(_multi_group(10, 3, label_0=labels)) as reader:
        with pytest.raises(DatasetFormatError, match=r"row 9: \(label_0, label_1\) = \(0.3, 0.0\)"):
            for p in reader.pairs():
                seen.append(p.row)
    assert seen == list(range(9))  # the caller saw the earlier rows: it must roll back


def test_streaming_counts_unlabelled_rows_and_stops_at_max_rows():
    from backend.dataset_io import open_pickapic_parquet

    has_label = [True, False, False, True, True, True, True]
    data = _multi_group(7, 2, has_label=has_label)
    with open_pickapic_parquet(data) as reader:
        got = [p.caption for p in reader.pairs(max_rows=3)]
        assert got == ["c0", "c3", "c4"]
        # stopped at row 4 (the 3rd labelled row): rows 5 and 6 were never read
        assert (reader.rows_read, reader.rows_unlabelled) == (5, 2)


def test_import_progress_logs_without_a_terminal(caplog):
    import logging

    from backend.dataset_io import ImportProgress

    with caplog.at_level(logging.INFO, logger="backend.dataset_io"):
        with ImportProgress("imp", bar=False, every_s=3600) as progress:
            progress(3, 10)  # first call: logged
            progress(6, 10)  # within every_s: not logged
            progress(10, 10)  # the end: always logged
    assert [r.getMessage() for r in caplog.records] == [
        "imp: 3/10 rows read (30%)",
        "imp: 10/10 rows read (100%)",
    ]
