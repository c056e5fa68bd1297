"""/v1/files: upload a batch file (its form parsed as it streams, forms.py; the file written
within the limits by entrypoints/api/uploads.py), look at it, download it — and download a
batch's output and error files, which OpenAI also serves as files."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from entrypoints.api.deps import Caller, Tenant, own_batch, own_file, settings_of
from entrypoints.api.errors import api_error
from entrypoints.api.forms import FileSniff, Form
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
async def upload(caller: Caller, request: Request) -> dict[str, Any]:
    """Async, so the body streams through; every store call goes to the thread pool, so an
    upload never holds the event loop (nor another tenant's requests) on a database write."""
    settings = settings_of(request)
    try:
        form = Form(request.headers.get("content-type", ""))
    except UploadRefused as exc:
        raise api_error(exc.status, str(exc), "invalid_upload") from exc
    sniff = FileSniff(settings.limits)

    async def chunks() -> AsyncIterator[bytes]:
        async for block in request.stream():
            for piece in form.feed(block):
                sniff.feed(piece)
                yield piece
        form.finish()
        sniff.finish()

    try:
        stored = await store_upload(chunks(), settings.data_dir / "files", settings.limits)
    except UploadRefused as exc:
        code = "limit_exceeded" if exc.status == 413 else "invalid_file"
        raise api_error(exc.status, str(exc), code) from exc
    except ClientDisconnect as exc:
        raise api_error(400, "the upload ended early", "invalid_upload") from exc
    try:
        row = await run_in_threadpool(
            lambda: files.add_file(
                settings.db,
                file_id=stored.file_id,
                tenant=caller.tenant,
                filename=form.filename or "batch.jsonl",
                purpose="batch",
                size=stored.bytes,
                lines=stored.lines,
                sha256=stored.sha256,
                path=str(stored.path),
                endpoint=sniff.url,
                max_stored_bytes=caller.max_stored_bytes,
            )
        )
    except files.StorageQuotaExceeded as exc:
        Path(stored.path).unlink(missing_ok=True)
        raise api_error(413, str(exc), "quota_exceeded") from exc
    except BaseException:
        Path(stored.path).unlink(missing_ok=True)  # no row points at it: no orphan
        raise
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
