"""/v1/batches: create (admitted in the store within the tier's backpressure, then started),
look, list, cancel.

A created batch is registered in the store in the same request (so it is never lost), then
started: by a Prefect deployment when one is configured (`run_deployment(timeout=0)`), else in
this process's runner threads (`app.state.runner`)."""

from __future__ import annotations

import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Header, Request
from pydantic import BaseModel

from entrypoints.api.deps import Tenant, api_error, own_batch, own_file, settings_of
from offline_queue.batches import batch_object
from offline_queue.formats import SUPPORTED_URLS, BatchObject
from offline_queue.runs import BatchRun
from offline_queue.states import TERMINAL_STATUSES, BatchStatus, Tier
from offline_queue.store import batches
from offline_queue.store.tables import Batch

if TYPE_CHECKING:
    from entrypoints.api.app import ApiSettings

_WINDOW = re.compile(r"^(\d+)([smhd])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}

router = APIRouter()


class CreateBatch(BaseModel):
    input_file_id: str
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, str] | None = None


def api_batch(settings: ApiSettings, b: Batch) -> dict[str, Any]:
    obj: BatchObject = batch_object(settings.db, b)
    data = obj.model_dump(mode="json", exclude={"input_file", "output_file", "error_file", "run"})
    data["input_file_id"] = b.input_file_id or data["input_file_id"]
    data["endpoint"] = b.endpoint or data["endpoint"]
    data["completion_window"] = b.completion_window or "24h"
    data["expires_at"] = b.expires_at
    data["cancelling_at"], data["cancelled_at"] = b.cancelling_at, b.cancelled_at
    data["expired_at"] = b.expired_at
    return data


@router.post("/v1/batches")
def create_batch(
    body: CreateBatch,
    who: Tenant,
    request: Request,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> dict[str, Any]:
    settings = settings_of(request)
    if body.endpoint not in SUPPORTED_URLS:
        raise api_error(
            400,
            f"endpoint {body.endpoint!r}: supported are {', '.join(SUPPORTED_URLS)}",
            "invalid_endpoint",
        )
    window = _WINDOW.match(body.completion_window)
    if not window:
        raise api_error(400, "completion_window: like 24h, 30m, 90s", "invalid_completion_window")
    meta = body.metadata or {}
    try:
        tier = Tier(meta.get("tier", Tier.STANDARD))
    except ValueError as exc:
        raise api_error(
            400, f"metadata.tier {meta.get('tier')!r}: critical, standard or bulk", "invalid_tier"
        ) from exc
    try:
        weight = int(meta.get("weight", "1"))
    except ValueError as exc:
        raise api_error(400, "metadata.weight: a whole number", "invalid_weight") from exc
    f = own_file(settings, body.input_file_id, who)
    key = f"{who}:{idempotency_key}" if idempotency_key else None
    batch_id = f"batch_{uuid.uuid4().hex[:24]}"
    seconds = int(window.group(1)) * _UNIT[window.group(2)]
    outputs_dir = settings.data_dir / "outputs"
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
        raise api_error(429, str(exc), "rate_limit_exceeded", {"Retry-After": "30"}) from exc
    if not created:
        return api_batch(settings, batch)
    start_batch(
        settings,
        request.app.state.runner,
        batch_id,
        f.path,
        who,
        tier,
        weight,
        meta.get("user_group"),
    )
    return api_batch(settings, own_batch(settings, batch_id, who))


def start_batch(
    settings: ApiSettings,
    runner: ThreadPoolExecutor,
    batch_id: str,
    path: str,
    who: str,
    tier: Tier,
    weight: int,
    group: str | None,
) -> None:
    run = BatchRun(
        input=path,
        batch_id=batch_id,
        tier=tier,
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


@router.get("/v1/batches/{batch_id}")
def get_batch(batch_id: str, who: Tenant, request: Request) -> dict[str, Any]:
    settings = settings_of(request)
    return api_batch(settings, own_batch(settings, batch_id, who))


@router.get("/v1/batches")
def list_batches(
    who: Tenant, request: Request, after: str | None = None, limit: int = 20
) -> dict[str, Any]:
    settings = settings_of(request)
    limit = max(1, min(limit, 100))
    page, has_more = batches.tenant_batches(settings.db, who, limit, after)
    data = [api_batch(settings, b) for b in page]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }


@router.post("/v1/batches/{batch_id}/cancel")
def cancel(batch_id: str, who: Tenant, request: Request) -> dict[str, Any]:
    settings = settings_of(request)
    b = own_batch(settings, batch_id, who)
    if b.status not in TERMINAL_STATUSES and b.status != BatchStatus.CANCELLING:
        batches.request_cancel(settings.db, batch_id)
    return api_batch(settings, own_batch(settings, batch_id, who))
