"""The OpenAI-compatible batch API: /v1/files and /v1/batches, per-tenant API keys, limits and
backpressure. The official `openai` SDK works against it unchanged.

A created batch is registered in the store in the same request (so it is never lost), then
started: by a Prefect deployment when one is configured (`run_deployment(timeout=0)`), else in
this process's runner threads. Everything a tenant sees is scoped to it: another tenant's file
or batch is a 404.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, cast

from fastapi import Depends, FastAPI, File, Form, Header, HTTPException, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, Field

from offline_queue.api.auth import tenant_for_key
from offline_queue.api.files import UploadRefused, store_upload
from offline_queue.batches import batch_object
from offline_queue.formats import SUPPORTED_URLS, TERMINAL_STATUSES, BatchObject
from offline_queue.runs import BatchRun, Tier
from offline_queue.store import batches, files
from offline_queue.store.tables import Batch, StoredFile
from offline_queue.validate import Limits

_WINDOW = re.compile(r"^(\d+)([smhd])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class ApiSettings(BaseModel):
    db: str
    data_dir: Path
    engine: str | None = Field(default=None, description="Engine URL or block for local runs.")
    model: str | None = None
    deployment: str | None = Field(
        default=None,
        description="Start batches as runs of this deployment (e.g. route-batch/default) "
        "instead of in this process.",
    )
    workers: int = Field(default=1, ge=1, description="Batches run at once in this process.")
    chunk_size: int = 256
    limits: Limits = Field(default_factory=Limits)
    max_queued: dict[str, int] = Field(
        default_factory=lambda: {"critical": 100_000, "standard": 2_000_000, "bulk": 10_000_000},
        description="Requests waiting per tier (all tenants) before new batches get 429.",
    )

    model_config = {"arbitrary_types_allowed": True}


class CreateBatch(BaseModel):
    input_file_id: str
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, str] | None = None


def _error(
    status: int, message: str, code: str, headers: dict[str, str] | None = None
) -> HTTPException:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return HTTPException(
        status, {"error": {"message": message, "type": kind, "param": None, "code": code}}, headers
    )


def current_tenant(request: Request, authorization: Annotated[str | None, Header()] = None) -> str:
    """The tenant of the bearer key; 401 without a valid key."""
    if not authorization or not authorization.lower().startswith("bearer "):
        raise _error(401, "no API key: send Authorization: Bearer <key>", "invalid_api_key")
    found = tenant_for_key(request.app.state.settings.db, authorization.split(" ", 1)[1].strip())
    if found is None:
        raise _error(401, "invalid API key", "invalid_api_key")
    return found


Tenant = Annotated[str, Depends(current_tenant)]


def create_app(settings: ApiSettings) -> FastAPI:
    app = FastAPI(title="offline-queue", version="0.1.0")
    app.state.settings = settings
    runner = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="batch")
    files_dir = settings.data_dir / "files"
    outputs_dir = settings.data_dir / "outputs"

    @app.exception_handler(HTTPException)
    async def _openai_errors(_: Request, exc: HTTPException) -> JSONResponse:
        body = (
            exc.detail if isinstance(exc.detail, dict) else {"error": {"message": str(exc.detail)}}
        )
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

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

    def own_file(file_id: str, who: str) -> StoredFile:
        f = files.get_file(settings.db, file_id)
        if f is None or f.tenant != who:
            raise _error(404, f"no file {file_id}", "not_found")
        return f

    def own_batch(batch_id: str, who: str) -> Batch:
        b = batches.get_batch(settings.db, batch_id)
        if b is None or b.tenant != who:
            raise _error(404, f"no batch {batch_id}", "not_found")
        return b

    def api_batch(b: Batch) -> dict[str, Any]:
        obj: BatchObject = batch_object(settings.db, b)
        data = obj.model_dump(
            mode="json", exclude={"input_file", "output_file", "error_file", "run"}
        )
        data["input_file_id"] = b.input_file_id or data["input_file_id"]
        data["endpoint"] = b.endpoint or data["endpoint"]
        data["completion_window"] = b.completion_window or "24h"
        data["expires_at"] = b.expires_at
        data["cancelling_at"], data["cancelled_at"] = b.cancelling_at, b.cancelled_at
        data["expired_at"] = b.expired_at
        return data

    @app.post("/v1/files")
    async def upload(
        who: Tenant,
        request: Request,
        file: Annotated[UploadFile, File()],
        purpose: Annotated[str, Form()],
    ) -> dict[str, Any]:
        if purpose != "batch":
            raise _error(400, f"purpose {purpose!r}: only 'batch' is supported", "invalid_purpose")
        declared = int(request.headers.get("content-length") or 0)
        if declared > settings.limits.max_file_bytes + 65536:
            raise _error(
                413,
                f"file is over {settings.limits.max_file_bytes} bytes (max_file_bytes)",
                "file_too_large",
            )

        async def chunks() -> AsyncIterator[bytes]:
            while block := await file.read(1 << 20):
                yield block

        try:
            stored = await store_upload(chunks(), files_dir, settings.limits)
        except UploadRefused as exc:
            raise _error(exc.status, str(exc), "limit_exceeded") from exc
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

    @app.get("/v1/files/{file_id}")
    def get_file(file_id: str, who: Tenant) -> dict[str, Any]:
        return file_object(own_file(file_id, who))

    @app.get("/v1/files/{file_id}/content")
    def file_content(file_id: str, who: Tenant) -> FileResponse:
        for suffix, attr in (("-output", "output_path"), ("-errors", "error_path")):
            if file_id.endswith(suffix):  # a batch's output or error file
                b = own_batch(file_id.removesuffix(suffix), who)
                path = Path(getattr(b, attr))
                if b.status not in TERMINAL_STATUSES or not path.exists():
                    raise _error(404, f"{file_id} is not ready", "not_found")
                return FileResponse(path, media_type="application/jsonl")
        return FileResponse(own_file(file_id, who).path, media_type="application/jsonl")

    @app.post("/v1/batches")
    def create_batch(
        body: CreateBatch,
        who: Tenant,
        idempotency_key: Annotated[str | None, Header()] = None,
    ) -> dict[str, Any]:
        if body.endpoint not in SUPPORTED_URLS:
            raise _error(
                400,
                f"endpoint {body.endpoint!r}: supported are {', '.join(SUPPORTED_URLS)}",
                "invalid_endpoint",
            )
        window = _WINDOW.match(body.completion_window)
        if not window:
            raise _error(400, "completion_window: like 24h, 30m, 90s", "invalid_completion_window")
        meta = body.metadata or {}
        tier = meta.get("tier", "standard")
        if tier not in settings.max_queued:
            raise _error(400, f"metadata.tier {tier!r}: critical, standard or bulk", "invalid_tier")
        try:
            weight = int(meta.get("weight", "1"))
        except ValueError as exc:
            raise _error(400, "metadata.weight: a whole number", "invalid_weight") from exc
        f = own_file(body.input_file_id, who)
        key = f"{who}:{idempotency_key}" if idempotency_key else None
        batch_id = f"batch_{uuid.uuid4().hex[:24]}"
        seconds = int(window.group(1)) * _UNIT[window.group(2)]
        try:
            batch, created = batches.admit_batch(
                settings.db,
                max_queued=settings.max_queued[tier],
                batch_id=batch_id,
                tenant=who,
                input_file_id=f.id,
                content_hash=f.sha256,
                input_path=f.path,
                output_path=str(outputs_dir / f"{batch_id}.output.jsonl"),
                error_path=str(outputs_dir / f"{batch_id}.errors.jsonl"),
                endpoint=body.endpoint,
                tier=tier,
                weight=weight,
                metadata=meta,
                idempotency_key=key,
                total_lines=f.lines,
                completion_window=body.completion_window,
                window_seconds=seconds,
            )
        except batches.AdmissionRefused as exc:
            raise _error(429, str(exc), "rate_limit_exceeded", {"Retry-After": "30"}) from exc
        if not created:
            return api_batch(batch)
        start_batch(batch_id, f.path, who, tier, weight, meta.get("user_group"))
        return api_batch(own_batch(batch_id, who))

    def start_batch(
        batch_id: str, path: str, who: str, tier: str, weight: int, group: str | None
    ) -> None:
        run = BatchRun(
            input=path,
            batch_id=batch_id,
            tier=cast(Tier, tier),  # one of settings.max_queued's: checked by create_batch
            weight=weight,
            tenant=who,
            db=settings.db,
        )
        if settings.deployment:
            from prefect.deployments import run_deployment

            params = run.parameters()
            if settings.deployment.startswith("route-batch/") and group:
                params["user_group"] = group
            run_deployment(settings.deployment, parameters=params, timeout=0)
            return
        from flows.batch import batch_inference

        here = run.model_copy(
            update={
                "engine": settings.engine,
                "model": settings.model,
                "chunk_size": settings.chunk_size,
            }
        )
        runner.submit(lambda: batch_inference(**here.parameters()))

    @app.get("/v1/batches/{batch_id}")
    def get_batch(batch_id: str, who: Tenant) -> dict[str, Any]:
        return api_batch(own_batch(batch_id, who))

    @app.get("/v1/batches")
    def list_batches(who: Tenant, after: str | None = None, limit: int = 20) -> dict[str, Any]:
        limit = max(1, min(limit, 100))
        page, has_more = batches.tenant_batches(settings.db, who, limit, after)
        data = [api_batch(b) for b in page]
        return {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": has_more,
        }

    @app.post("/v1/batches/{batch_id}/cancel")
    def cancel(batch_id: str, who: Tenant) -> dict[str, Any]:
        b = own_batch(batch_id, who)
        if b.status not in TERMINAL_STATUSES and b.status != "cancelling":
            batches.request_cancel(settings.db, batch_id)
        return api_batch(own_batch(batch_id, who))

    @app.on_event("shutdown")
    def _stop_runner() -> None:
        runner.shutdown(wait=False, cancel_futures=True)

    return app
