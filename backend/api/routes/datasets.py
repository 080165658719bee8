from __future__ import annotations

import tempfile
from collections.abc import Iterator
from typing import IO, Annotated, Literal

from fastapi import APIRouter, File, HTTPException, Query, UploadFile
from fastapi.responses import StreamingResponse

from backend.api.deps import AdminUser, SessionDep, StateDep
from backend.schemas import ImportResultPublic
from backend.services import datasets as dataset_service

router = APIRouter(tags=["datasets"])

_CHUNK = 1 << 16


def _iter_file(fh: IO[bytes]) -> Iterator[bytes]:
    try:
        fh.seek(0)
        while chunk := fh.read(_CHUNK):
            yield chunk
    finally:
        fh.close()


@router.get(
    "/export",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/vnd.apache.parquet": {}, "application/jsonl": {}}}},
)
def export_dataset(
    session: SessionDep,
    state: StateDep,
    admin: AdminUser,
    format: Annotated[Literal["pickapic", "jsonl"], Query()] = "pickapic",
) -> StreamingResponse:
    """The human preferences in Pick-a-Pic's parquet schema (``pickapic``) or as JSON lines.
    Built in a spooled temporary file within one read transaction, then streamed."""
    try:
        from backend import dataset_io
    except ImportError:
        raise HTTPException(503, detail="the dataset module is not installed") from None
    records = dataset_service.iter_export_records(session, state.store)
    fh = tempfile.SpooledTemporaryFile(max_size=32 << 20)
    if format == "pickapic":
        dataset_io.write_pickapic_parquet(records, fh)
        media, name = "application/vnd.apache.parquet", "prefloop-pickapic.parquet"
    else:
        for line in dataset_io.export_jsonl_lines(records):
            fh.write(line.encode() if isinstance(line, str) else line)
            if isinstance(line, str) and not line.endswith("\n"):
                fh.write(b"\n")
        media, name = "application/jsonl", "prefloop.jsonl"
    session.rollback()
    return StreamingResponse(
        _iter_file(fh),
        media_type=media,
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


@router.post("/import", response_model=ImportResultPublic, status_code=201)
def import_dataset(
    file: Annotated[UploadFile, File(description="A Pick-a-Pic parquet file.")],
    session: SessionDep,
    state: StateDep,
    admin: AdminUser,
) -> ImportResultPublic:
    """Import Pick-a-Pic parquet rows as pairs with votes (all or nothing; 422 on a bad
    file; 413 above the upload limit). The upload, spooled to a temporary file by the
    multipart parser, is read in place row group by row group, never copied whole into
    memory; the result counts the file's rows read and its row groups."""
    try:
        import backend.dataset_io  # noqa: F401
    except ImportError:
        raise HTTPException(503, detail="the dataset module is not installed") from None
    file.file.seek(0)
    result = dataset_service.import_pairs(
        session, state.store, file.file, max_rows=state.settings.import_max_rows
    )
    session.commit()
    return ImportResultPublic(**result.__dict__)
