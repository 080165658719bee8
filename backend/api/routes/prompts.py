from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, status
from pydantic import TypeAdapter, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from backend.api.deps import (
    AdminUser,
    CurrentUser,
    IdPath,
    Limit,
    Offset,
    SessionDep,
    StateDep,
)
from backend.api.errors import _json_safe_errors
from backend.schemas import (
    PromptCreate,
    PromptPublic,
    PromptsCreated,
    PromptsPublic,
    PromptText,
    PromptUpdate,
)
from backend.services import prompts as prompt_service
from backend.services.prompts import PromptIn
from backend.text_input import NO_NUL_PATTERN

router = APIRouter(prefix="/prompts", tags=["prompts"])

_JSON_BODY = TypeAdapter(list[PromptCreate | PromptText])

_REQUEST_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "anyOf": [
                        {
                            "type": "string",
                            "minLength": 1,
                            "maxLength": 2000,
                            "pattern": NO_NUL_PATTERN,
                        },
                        PromptCreate.model_json_schema(),
                    ]
                },
            }
        },
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file"],
                "additionalProperties": False,
                "properties": {
                    "file": {
                        "type": "string",
                        "format": "binary",
                        "description": "A .txt, .csv or .jsonl prompt file.",
                    },
                    "source": {"type": "string", "maxLength": 128, "pattern": NO_NUL_PATTERN},
                },
            }
        },
    },
}


async def _parse_request(request: Request) -> list[PromptIn]:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise HTTPException(422, detail=f"invalid JSON body: {exc}") from None
        try:
            items = _JSON_BODY.validate_python(data)
        except ValidationError as exc:
            raise HTTPException(422, detail=_json_safe_errors(exc.errors())) from None
        if not items:
            raise HTTPException(422, detail="empty prompt list")
        parsed = [PromptIn(i) if isinstance(i, str) else PromptIn(i.text, i.source) for i in items]
        try:
            return prompt_service.validate_prompts(parsed)
        except prompt_service.PromptFileError as exc:
            raise HTTPException(422, detail=exc.detail) from None
    if ctype == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=4)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise HTTPException(422, detail="multipart body needs a 'file' part")
        source = form.get("source")
        if source is not None and not isinstance(source, str):
            raise HTTPException(422, detail="source must be a string")
        source = prompt_service.check_default_source(source, "source")
        if source is None:
            source = prompt_service.check_default_source(upload.filename, "file name (the source)")
        data = await upload.read()
        fmt = prompt_service.detect_format(upload.filename, upload.content_type)
        return prompt_service.parse_prompt_file(data, fmt, source=source)
    raise HTTPException(
        status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
        detail="send a JSON list or a multipart/form-data upload with a 'file' part",
    )


@router.post(
    "",
    response_model=PromptsCreated,
    status_code=status.HTTP_201_CREATED,
    openapi_extra={"requestBody": _REQUEST_BODY},
    responses={
        413: {"description": "Upload too large."},
        415: {"description": "Neither JSON nor multipart/form-data."},
        422: {"description": "Invalid list or file (the detail names the line)."},
    },
)
async def create_prompts(
    request: Request, session: SessionDep, state: StateDep, admin: AdminUser
) -> PromptsCreated:
    """Add prompts from a JSON list (strings or ``{text, source}``) or an uploaded
    .txt / .csv / .jsonl file. All or nothing: any bad line rejects the whole request."""
    items = await _parse_request(request)

    def _store() -> prompt_service.AddResult:
        result = prompt_service.add_prompts(session, items)
        session.commit()
        return result

    result = await run_in_threadpool(_store)
    return PromptsCreated(created=result.created, existing=result.existing)


@router.get("", response_model=PromptsPublic)
def list_prompts(
    session: SessionDep,
    user: CurrentUser,
    offset: Offset = 0,
    limit: Limit = 100,
    active: Annotated[bool | None, Query()] = None,
) -> PromptsPublic:
    rows, count = prompt_service.list_prompts(session, offset=offset, limit=limit, active=active)
    return PromptsPublic(data=[PromptPublic.model_validate(r) for r in rows], count=count)


@router.patch("/{prompt_id}", response_model=PromptPublic)
def update_prompt(
    prompt_id: IdPath, body: PromptUpdate, session: SessionDep, admin: AdminUser
) -> PromptPublic:
    """Activate or deactivate a prompt: the pool draws new images for active prompts only."""
    prompt = prompt_service.set_active(session, prompt_id, body.active)
    session.commit()
    return PromptPublic.model_validate(prompt)
