"""/v1/files: upload a batch file (its form parsed as it streams, forms.py; its bytes written
within the limits into the store, or under `files_root`, by offline_queue/files.py), list, look
at, download and delete files — and download a batch's output and error files, which OpenAI also
serves as files and which are streamed from the batch's result rows. Nothing is read from this
host's disk: any API host of the cluster serves any file."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from starlette.requests import ClientDisconnect

from offline_queue.api.deps import FILE_ID, Caller, Tenant, own_batch, own_file, page, settings_of
from offline_queue.api.errors import api_error
from offline_queue.api.forms import FileSniff, Form
from offline_queue.batches import OutputsRemoved, output_source
from offline_queue.files import UploadRefused, delete_file, store_upload
from offline_queue.states import TERMINAL_STATUSES
from offline_queue.storage import locate
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

    async def pieces() -> AsyncIterator[bytes]:
        async for block in request.stream():
            for piece in form.feed(block):
                sniff.feed(piece)
                yield piece
        form.finish()
        sniff.finish()

    stream = pieces()
    try:
        # The form's header is parsed by the time the file's first bytes come: its name known.
        first = await anext(stream, b"")

        async def blocks() -> AsyncIterator[bytes]:
            if first:
                yield first
            async for piece in stream:
                yield piece

        name, quota = form.filename or "batch.jsonl", caller.max_stored_bytes
        upload = files.Upload(caller.tenant, name, "batch", max_stored_bytes=quota)
        row = await store_upload(
            blocks(), settings.limits, upload, db=settings.db, root=settings.files_root,
            endpoint=lambda: sniff.url,
        )  # fmt: skip
    except UploadRefused as exc:
        code = "limit_exceeded" if exc.status == 413 else "invalid_file"
        raise api_error(exc.status, str(exc), code) from exc
    except files.StorageQuotaExceeded as exc:
        raise api_error(413, str(exc), "quota_exceeded") from exc
    except ClientDisconnect as exc:
        raise api_error(400, "the upload ended early", "invalid_upload") from exc
    return file_object(row)


@router.get("/v1/files")
def list_files(
    who: Tenant,
    request: Request,
    purpose: Annotated[str | None, Query(max_length=32)] = None,
    after: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    order: Literal["asc", "desc"] = "desc",
) -> dict[str, Any]:
    """OpenAI's list: the tenant's files, newest first by default, `after` a file id."""
    settings = settings_of(request)
    if after is not None and not FILE_ID.match(after):
        raise api_error(400, "after: a file id (file-…)", "invalid_after", param="after")
    rows, has_more = files.list_files(
        settings.db, who, purpose=purpose, limit=limit, after=after, order=order
    )
    return page([file_object(f) for f in rows], has_more)


@router.get("/v1/files/{file_id}")
def get_file(file_id: str, who: Tenant, request: Request) -> dict[str, Any]:
    return file_object(own_file(settings_of(request), file_id, who))


@router.delete("/v1/files/{file_id}")
def remove_file(file_id: str, who: Tenant, request: Request) -> dict[str, Any]:
    """A file a batch is still reading (its lines not all queued yet) is a 409: once they are
    queued the batch no longer needs the file, and deleting it changes nothing for the batch."""
    settings = settings_of(request)
    own_file(settings, file_id, who)
    try:
        deleted = delete_file(settings.db, file_id)
    except files.FileInUse as exc:
        raise api_error(409, str(exc), "file_in_use") from exc
    return {"id": file_id, "object": "file", "deleted": deleted}


@router.get("/v1/files/{file_id}/content")
def file_content(file_id: str, who: Tenant, request: Request) -> StreamingResponse:
    settings = settings_of(request)
    for suffix, kind in (("-output", "output"), ("-errors", "errors")):
        if file_id.endswith(suffix):  # a batch's output or error file
            b = own_batch(settings, file_id.removesuffix(suffix), who)
            if b.status not in TERMINAL_STATUSES:
                raise api_error(404, f"{file_id} is not ready", "not_found")
            try:
                content = output_source(settings.db, b, kind)  # type: ignore[arg-type]
            except OutputsRemoved as exc:
                raise api_error(410, f"{file_id} expired and was removed", "expired") from exc
            except FileNotFoundError as exc:
                raise api_error(404, f"{file_id} is not ready", "not_found") from exc
            return StreamingResponse(content, media_type="application/jsonl")
    f = own_file(settings, file_id, who)
    return StreamingResponse(_blocks(settings.db, f.path), media_type="application/jsonl")


def _blocks(db: str, path: str, size: int = 1 << 20) -> Iterator[bytes]:
    with locate(path, db).open_read() as handle:
        while block := handle.read(size):
            yield block
