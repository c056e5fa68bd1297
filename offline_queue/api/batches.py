"""/v1/batches: create (validated, admitted in the store within the caller's rights and the tier's
backpressure, then started), look, list, cancel. A created batch is registered in the request, so
it is never lost, then started by a Prefect deployment when one is configured
(`run_deployment(timeout=0)`), else on a thread of its own here (runs.py). A run that ends without
finishing its batch ends it at once (`failed` with the reason, or `cancelled`)."""

from __future__ import annotations

import logging
import re
import uuid
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator

from offline_queue.api import runs
from offline_queue.api.deps import (
    BATCH_ID,
    Caller,
    Rights,
    Tenant,
    own_batch,
    own_file,
    page,
    settings_of,
)
from offline_queue.api.errors import api_error
from offline_queue.batch_object import BatchObject
from offline_queue.batches import batch_object, virtual_outputs
from offline_queue.durations import duration_seconds
from offline_queue.formats import SUPPORTED_URLS
from offline_queue.runs import BatchRun
from offline_queue.states import MAX_WEIGHT, TERMINAL_STATUSES, BatchStatus, Tier
from offline_queue.store import admission, batches, owners
from offline_queue.store.expiry import set_output_expiry
from offline_queue.store.tables import Batch
from offline_queue.submission import Submission

if TYPE_CHECKING:
    from offline_queue.api.settings import ApiSettings

log = logging.getLogger(__name__)

MAX_WINDOW_SECONDS = 7 * 86400
"""OpenAI takes only `24h`; this server takes any window from 1s to 7d."""
_WEIGHT = re.compile(r"\A[1-9][0-9]{0,3}\Z", re.ASCII)
_IDEMPOTENCY_KEY = re.compile(r"\A[\x21-\x7e]{1,255}\Z")
MAX_METADATA_KEYS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512  # OpenAI's limits

router = APIRouter()


class OutputExpiry(BaseModel):
    """OpenAI's `output_expires_after`: the batch's output and error files are removed this many
    seconds after the anchor (OpenAI: 1 hour to 30 days)."""

    model_config = ConfigDict(extra="forbid")

    anchor: Literal["created_at"]
    seconds: int = Field(ge=3600, le=30 * 86400)


class CreateBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(max_length=64)
    endpoint: str = Field(max_length=64)
    completion_window: str = Field(default="24h", max_length=16)
    metadata: dict[str, str] | None = None
    output_expires_after: OutputExpiry | None = None

    @field_validator("metadata")
    @classmethod
    def _openai_metadata(cls, meta: dict[str, str] | None) -> dict[str, str] | None:
        if meta is None:
            return None
        if len(meta) > MAX_METADATA_KEYS:
            raise ValueError(f"at most {MAX_METADATA_KEYS} keys")
        for key, value in meta.items():
            if not 0 < len(key) <= MAX_METADATA_KEY or "\x00" in key:
                raise ValueError(f"keys are 1 to {MAX_METADATA_KEY} characters, no NUL")
            if len(value) > MAX_METADATA_VALUE or "\x00" in value:
                raise ValueError(f"values are at most {MAX_METADATA_VALUE} characters, no NUL")
        return meta


def api_batch(settings: ApiSettings, b: Batch, *, estimate: bool = False) -> dict[str, Any]:
    obj: BatchObject = batch_object(settings.db, b, estimate=estimate)
    data = obj.model_dump(mode="json", exclude={"input_file", "output_file", "error_file", "run"})
    data["input_file_id"] = b.input_file_id or data["input_file_id"]
    data["endpoint"] = b.endpoint or data["endpoint"]
    data["completion_window"] = b.completion_window or "24h"
    data["expires_at"] = b.expires_at
    data["cancelling_at"], data["cancelled_at"] = b.cancelling_at, b.cancelled_at
    data["expired_at"] = b.expired_at
    return data


def window_seconds(window: str) -> int:
    seconds = duration_seconds(window) or 0
    if not 0 < seconds <= MAX_WINDOW_SECONDS:
        raise api_error(
            400,
            "completion_window: a duration like 24h, 30m or 90s, from 1s to 7d",
            "invalid_completion_window",
            param="completion_window",
        )
    return seconds


def tier_and_weight(meta: dict[str, str], rights: Rights) -> tuple[Tier, int]:
    """`metadata.tier` and `metadata.weight`: requests within the key's rights."""
    try:
        tier = Tier(meta.get("tier", Tier.STANDARD))
    except ValueError as exc:
        raise api_error(
            400, "metadata.tier: critical, standard or bulk", "invalid_tier", param="metadata"
        ) from exc
    if tier not in rights.tiers:
        raise api_error(
            403,
            f"this key may not use the {tier} tier (it may use: {', '.join(rights.tiers)})",
            "tier_not_allowed",
            param="metadata",
        )
    raw = meta.get("weight", "1")
    if not _WEIGHT.match(raw) or int(raw) > MAX_WEIGHT:
        raise api_error(
            400,
            f"metadata.weight: a whole number from 1 to {MAX_WEIGHT}",
            "invalid_weight",
            param="metadata",
        )
    weight = int(raw)
    if weight > rights.max_weight:
        raise api_error(
            403,
            f"this key may ask for a weight of at most {rights.max_weight}",
            "weight_not_allowed",
            param="metadata",
        )
    return tier, weight


@router.post("/v1/batches")
def create_batch(
    body: CreateBatch,
    caller: Caller,
    request: Request,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> dict[str, Any]:
    settings = settings_of(request)
    who = caller.tenant
    if body.endpoint not in SUPPORTED_URLS:
        raise api_error(
            400,
            f"endpoint: supported are {', '.join(SUPPORTED_URLS)}",
            "invalid_endpoint",
            param="endpoint",
        )
    seconds = window_seconds(body.completion_window)
    meta = body.metadata or {}
    tier, weight = tier_and_weight(meta, caller)
    if idempotency_key is not None and not _IDEMPOTENCY_KEY.match(idempotency_key):
        raise api_error(
            400,
            "Idempotency-Key: 1 to 255 visible ASCII characters",
            "invalid_idempotency_key",
        )
    f = own_file(settings, body.input_file_id, who)
    if f.endpoint and f.endpoint != body.endpoint:
        raise api_error(
            400,
            f"the file's requests are for {f.endpoint}: create the batch for that endpoint",
            "endpoint_mismatch",
            param="endpoint",
        )
    batch_id = f"batch_{uuid.uuid4().hex[:24]}"
    # The output and error files are the batch's result rows: any node's API serves them.
    sub = Submission(
        batch_id, f.sha256, f.path, *virtual_outputs(batch_id), tier, weight, metadata=meta,
        idempotency_key=idempotency_key, tenant=who, input_file_id=f.id, endpoint=body.endpoint,
        total_lines=f.lines, completion_window=body.completion_window,
    )  # fmt: skip
    try:
        batch, created = admission.admit_batch(
            settings.db,
            sub,
            max_queued=settings.max_queued[tier],
            max_waiting=caller.max_waiting,
            window_seconds=seconds,
        )
    except admission.AdmissionRefused as exc:
        raise api_error(429, str(exc), "rate_limit_exceeded", {"Retry-After": "30"}) from exc
    except admission.IdempotencyConflict as exc:
        raise api_error(409, str(exc), "idempotency_key_reused") from exc
    if not created:
        return api_batch(settings, batch)
    if body.output_expires_after is not None:
        set_output_expiry(settings.db, batch_id, body.output_expires_after.seconds)
    start_batch(settings, sub, f.id, meta.get("user_group"))
    return api_batch(settings, own_batch(settings, batch_id, who))


def start_batch(settings: ApiSettings, sub: Submission, file_id: str, group: str | None) -> None:
    """Start the run of the batch just admitted (`sub`): on the deployment, or here. `file_id`
    stands for the input's path in whatever a tenant reads of a failure."""
    batch_id, path = sub.id, sub.input_path
    run = BatchRun(
        input=path,
        batch_id=batch_id,
        tier=Tier(sub.tier),
        weight=sub.weight,
        tenant=sub.tenant,
        db=settings.db,
        lease_seconds=settings.lease_seconds,
    )
    if settings.deployment:
        from prefect.deployments import run_deployment

        params = run.parameters()
        if settings.deployment.startswith("route-batch/") and group:
            params["user_group"] = group
        try:
            started = run_deployment(settings.deployment, parameters=params, timeout=0)
        except Exception as exc:
            log.exception("batch %s could not be started", batch_id)
            owners.fail_run(
                settings.db,
                owners.RUN_FAILED,
                f"the batch could not be started: {runs.reason(exc, path, file_id)}",
                batch_id=batch_id,
            )
            return
        runs.awaiting(settings, batch_id, started)  # type: ignore[arg-type]  # sync: a FlowRun
        return
    here = run.model_copy(
        update={
            "engine": settings.engine,
            "model": settings.model,
            "chunk_size": settings.chunk_size,
        }
    )
    runs.run_here(settings, batch_id, here.parameters(), path, file_id)


@router.get("/v1/batches/{batch_id}")
def get_batch(batch_id: str, who: Tenant, request: Request) -> dict[str, Any]:
    settings = settings_of(request)
    return api_batch(settings, own_batch(settings, batch_id, who), estimate=True)


@router.get("/v1/batches")
def list_batches(
    who: Tenant,
    request: Request,
    after: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> dict[str, Any]:
    settings = settings_of(request)
    if after is not None and not BATCH_ID.match(after):
        raise api_error(400, "after: a batch id (batch_…)", "invalid_after", param="after")
    found, has_more = batches.tenant_batches(settings.db, who, limit, after)
    return page([api_batch(settings, b) for b in found], has_more)


@router.post("/v1/batches/{batch_id}/cancel")
def cancel(batch_id: str, who: Tenant, request: Request) -> dict[str, Any]:
    settings = settings_of(request)
    b = own_batch(settings, batch_id, who)
    if b.status not in TERMINAL_STATUSES and b.status != BatchStatus.CANCELLING:
        batches.request_cancel(settings.db, batch_id)
    return api_batch(settings, own_batch(settings, batch_id, who))
