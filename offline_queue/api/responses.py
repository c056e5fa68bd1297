"""Single requests through the queue: background responses (`POST /v1/responses` with
`background: true`, then GET and cancel) and synchronous calls (`/v1/responses`,
`/v1/chat/completions`) that wait on the connection. Each is a batch of one request in the same
queue (store/responses.py), at its `service_tier`'s tier, under the same tenants, rights and
admission; a synchronous call whose client goes away is cancelled (docs/user-guide.md).
"""

from __future__ import annotations

import asyncio
import os
import re
import time
import uuid
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from offline_queue.api.deps import Caller, settings_of
from offline_queue.api.errors import api_error
from offline_queue.findings import Accepted
from offline_queue.states import SERVICE_TIERS, BatchStatus, Tier
from offline_queue.store import admission
from offline_queue.store import responses as store
from offline_queue.submission import Submission
from offline_queue.validate import Limits, validate_line

if TYPE_CHECKING:
    from offline_queue.api.settings import ApiSettings

router = APIRouter()

_glance = admission.Glance()
"""This process's view of the tiers' and tenants' waiting work (a single request's admission)."""
RESPONSE_ID = re.compile(r"\Aresp_[0-9a-f]{32}\Z")
POLL_SECONDS = 0.05
"""How often a waiting call looks for its answer: well under a step of any engine."""
_STATUS = {
    BatchStatus.VALIDATING: "queued",
    BatchStatus.IN_PROGRESS: "in_progress",
    BatchStatus.FINALIZING: "in_progress",
    BatchStatus.CANCELLING: "in_progress",
    BatchStatus.COMPLETED: "completed",
    BatchStatus.FAILED: "failed",
    BatchStatus.CANCELLED: "cancelled",
    BatchStatus.EXPIRED: "incomplete",
}


_ASKED_AS = {Tier.CRITICAL: "priority", Tier.STANDARD: "default", Tier.BULK: "flex"}
"""A tier shown as the service_tier that asks for it."""


def _tier(caller: Caller, service_tier: object) -> Tier:
    if service_tier is None:
        return Tier.STANDARD
    tier = SERVICE_TIERS.get(str(service_tier))
    if tier is None:
        raise api_error(
            400,
            f"service_tier: one of {', '.join(SERVICE_TIERS)}",
            "invalid_service_tier",
            param="service_tier",
        )
    if tier not in caller.tiers:
        raise api_error(
            403,
            f"this key may not use service_tier {service_tier} (the {tier} tier)",
            "tier_not_allowed",
            param="service_tier",
        )
    return tier


ROUTES_SECONDS = 10.0
"""How long a model's route is reused: a catalog change reaches single requests this late."""
_routes: dict[tuple[str | None, str], tuple[float, tuple[str, str | None, str | None]]] = {}


def _route(settings: ApiSettings, model: str) -> tuple[str, str | None, str | None]:
    """(route, engine, model) of a request naming `model`: its catalog entry's engine, else
    this API's engine. Remembered for ROUTES_SECONDS: the catalog and engine blocks are
    Prefect blocks, a round trip each."""
    key = (settings.engine, model)
    now = time.monotonic()
    known = _routes.get(key)
    if known is not None and now - known[0] < ROUTES_SECONDS:
        return known[1]
    from offline_queue.blocks.catalog import catalog_here
    from offline_queue.blocks.engines import route_of

    served = catalog_here().find(model)
    if served is not None:
        found = route_of(served.engine, served.model), served.engine, served.model
    else:
        found = route_of(settings.engine, None), settings.engine, None
    _routes[key] = (now, found)
    return found


def _queue(settings: ApiSettings, caller: Caller, url: str, body: dict[str, Any]) -> store.Seen:
    """Validate, admit and queue one request: what the store now holds of it."""
    service_tier = body.pop("service_tier", None)  # the queue's, not the engine's
    tier = _tier(caller, service_tier)
    response_id = f"resp_{uuid.uuid4().hex}"
    line = orjson.dumps({"custom_id": response_id, "method": "POST", "url": url, "body": body})
    limits = Limits()
    checked = validate_line(1, line, len(line) > limits.max_line_bytes, limits)
    if not isinstance(checked, Accepted):
        message = checked.error.message.removeprefix("line 1: ").removeprefix("body.")
        raise api_error(400, message, "invalid_request_error", param=message.split(":")[0])
    route, engine, model = _route(settings, checked.model)
    sub = Submission(
        response_id, response_id, f"request:{url}", "", "", tier, tenant=caller.tenant,
        endpoint=url, total_lines=1,
    )  # fmt: skip
    try:
        _glance.admit(
            settings.db, caller.tenant, tier, 1, settings.max_queued[tier], caller.max_waiting
        )
    except admission.AdmissionRefused as exc:
        raise api_error(429, str(exc), "rate_limit_exceeded", {"Retry-After": "5"}) from exc
    batch = store.create(settings.db, sub, route, checked)
    if settings.deployment is None:  # this process serves its own work
        from offline_queue.flows.waiting import SERVE_HERE_ENV, keep_own_loop
        from offline_queue.runs import BatchRun

        os.environ[SERVE_HERE_ENV] = "1"  # as a batch run here does (runs.run_here)

        run = BatchRun(input="-", engine=engine, model=model, lease_seconds=settings.lease_seconds)
        keep_own_loop(settings.db, route, run)
    return store.Seen(batch, "queued", None)


def response_object(seen: store.Seen, service_tier: str | None = None) -> dict[str, Any]:
    """OpenAI's response object: the answer's own when there is one, under this id."""
    b = seen.batch
    status = _STATUS[BatchStatus(b.status)]
    if status == "queued" and seen.state == "processing":
        status = "in_progress"
    body: dict[str, Any] = {}
    result = seen.result
    if result is not None and result.ok and result.body and status == "completed":
        body = orjson.loads(result.body)
    error = None
    if status == "failed" and result is not None:
        error = {"code": result.error_code or "server_error", "message": result.error_message}
    return {
        **body,
        "id": b.id,
        "object": "response",
        "created_at": b.created_at,
        "status": body.get("status", status) if status == "completed" else status,
        "background": True,
        "error": error,
        "output": body.get("output", []),
        "service_tier": service_tier or _ASKED_AS[Tier(b.tier)],
    }


def _seen(settings: ApiSettings, caller: Caller, response_id: str) -> store.Seen:
    seen = None
    if RESPONSE_ID.match(response_id):
        seen = store.look(settings.db, caller.tenant, response_id)
    if seen is None:
        raise api_error(404, f"No response found with id '{response_id}'.", "not_found")
    return seen


async def _body(request: Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError as exc:
        raise api_error(400, f"the body is not JSON ({exc})", "invalid_request_error") from exc
    if not isinstance(body, dict):
        raise api_error(400, "the body is not a JSON object", "invalid_request_error")
    return body


async def _answer(request: Request, settings: ApiSettings, caller: Caller, rid: str) -> store.Seen:
    """Wait for the request's answer while the client is there; cancel it if it leaves."""
    while True:
        seen = await asyncio.to_thread(store.look, settings.db, caller.tenant, rid)
        assert seen is not None
        if BatchStatus(seen.batch.status).terminal:
            return seen
        if await request.is_disconnected():
            await asyncio.to_thread(store.cancel, settings.db, caller.tenant, rid)
            raise api_error(499, "the client went away: cancelled", "client_closed_request")
        await asyncio.sleep(POLL_SECONDS)


def _failed(seen: store.Seen) -> JSONResponse:
    result = seen.result
    code = result.status_code if result is not None and result.status_code else 500
    message = result.error_message if result is not None else "the request was not answered"
    kind = result.error_code if result is not None else "server_error"
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": None, "code": kind}},
        status_code=code if 400 <= code < 600 else 500,
    )


@router.post("/v1/responses")
async def create_response(request: Request, caller: Caller) -> Any:
    settings = settings_of(request)
    body = await _body(request)
    tier_asked = body.get("service_tier")
    background = body.pop("background", False)
    if not isinstance(background, bool):
        raise api_error(
            400, "background: true or false", "invalid_request_error", param="background"
        )
    queued = await asyncio.to_thread(_queue, settings, caller, "/v1/responses", body)
    if background:
        return response_object(queued, tier_asked)
    seen = await _answer(request, settings, caller, queued.batch.id)
    if seen.batch.status != BatchStatus.COMPLETED:
        return _failed(seen)
    obj = response_object(seen, tier_asked)
    obj["background"] = False
    return obj


@router.post("/v1/chat/completions")
async def chat_completion(request: Request, caller: Caller) -> Any:
    """A synchronous chat completion through the queue (flex, or any service_tier)."""
    settings = settings_of(request)
    body = await _body(request)
    tier_asked = body.get("service_tier")
    queued = await asyncio.to_thread(_queue, settings, caller, "/v1/chat/completions", body)
    seen = await _answer(request, settings, caller, queued.batch.id)
    if seen.batch.status != BatchStatus.COMPLETED or seen.result is None or not seen.result.body:
        return _failed(seen)
    answer: dict[str, Any] = orjson.loads(seen.result.body)
    answer["service_tier"] = tier_asked or "default"
    return answer


@router.get("/v1/responses/{response_id}")
def get_response(response_id: str, request: Request, caller: Caller) -> dict[str, Any]:
    return response_object(_seen(settings_of(request), caller, response_id))


@router.post("/v1/responses/{response_id}/cancel")
def cancel_response(response_id: str, request: Request, caller: Caller) -> dict[str, Any]:
    settings = settings_of(request)
    seen = _seen(settings, caller, response_id)
    if BatchStatus(seen.batch.status).terminal:
        raise api_error(
            400, f"response {response_id} is already {_STATUS[BatchStatus(seen.batch.status)]}",
            "invalid_request_error",
        )  # fmt: skip
    store.cancel(settings.db, caller.tenant, response_id)
    return response_object(_seen(settings, caller, response_id))
