"""/v1/files: upload a batch file (streamed to disk within the limits, entrypoints/api/uploads.py),
look at it, download it — and download a batch's output and error files, which OpenAI also
serves as files."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import FileResponse

from entrypoints.api.deps import Tenant, api_error, own_batch, own_file, settings_of
from entrypoints.api.uploads import UploadRefused, store_upload
from offline_queue.states import TERMINAL_STATUSES
from offline_queue.store import files
from offline_queue.store.tables import StoredFile

router = APIRouter()


def file_object(f: StoredFile) -> dict[str, Any]:
    return {
        "id": f.id,
        "object": "file",
        "bytes": f.bytes,
        "created_at": f.created_at,
        "filename": f.filename,
        "purpose": f.purpose,
        "status": "processed",
    }


@router.post("/v1/files")
async def upload(
    who: Tenant,
    request: Request,
    file: Annotated[UploadFile, File()],
    purpose: Annotated[str, Form()],
) -> dict[str, Any]:
    settings = settings_of(request)
    if purpose != "batch":
        raise api_error(400, f"purpose {purpose!r}: only 'batch' is supported", "invalid_purpose")
    declared = int(request.headers.get("content-length") or 0)
    if declared > settings.limits.max_file_bytes + 65536:
        raise api_error(
            413,
            f"file is over {settings.limits.max_file_bytes} bytes (max_file_bytes)",
            "file_too_large",
        )

    async def chunks() -> AsyncIterator[bytes]:
        while block := await file.read(1 << 20):
            yield block

    try:
        stored = await store_upload(chunks(), settings.data_dir / "files", settings.limits)
    except UploadRefused as exc:
        raise api_error(exc.status, str(exc), "limit_exceeded") from exc
    row = files.add_file(
        settings.db,
        file_id=stored.file_id,
        tenant=who,
        filename=file.filename or "batch.jsonl",
        purpose=purpose,
        size=stored.bytes,
        lines=stored.lines,
        sha256=stored.sha256,
        path=str(stored.path),
    )
    return file_object(row)


@router.get("/v1/files/{file_id}")
def get_file(file_id: str, who: Tenant, request: Request) -> dict[str, Any]:
    return file_object(own_file(settings_of(request), file_id, who))


@router.get("/v1/files/{file_id}/content")
def file_content(file_id: str, who: Tenant, request: Request) -> FileResponse:
    settings = settings_of(request)
    for suffix, attr in (("-output", "output_path"), ("-errors", "error_path")):
        if file_id.endswith(suffix):  # a batch's output or error file
            b = own_batch(settings, file_id.removesuffix(suffix), who)
            path = Path(getattr(b, attr))
            if b.status not in TERMINAL_STATUSES or not path.exists():
                raise api_error(404, f"{file_id} is not ready", "not_found")
            return FileResponse(path, media_type="application/jsonl")
    return FileResponse(own_file(settings, file_id, who).path, media_type="application/jsonl")
