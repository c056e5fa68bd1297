"""What every route needs before it does anything: the caller's tenant (from the bearer key),
the app's settings, errors in OpenAI's shape, and the caller's own files and batches — another
tenant's is a 404, exactly as if it did not exist."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Header, HTTPException, Request

from entrypoints.api.auth import tenant_for_key
from offline_queue.store import batches, files
from offline_queue.store.tables import Batch, StoredFile

if TYPE_CHECKING:
    from entrypoints.api.app import ApiSettings


def api_error(
    status: int, message: str, code: str, headers: dict[str, str] | None = None
) -> HTTPException:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return HTTPException(
        status, {"error": {"message": message, "type": kind, "param": None, "code": code}}, headers
    )


def settings_of(request: Request) -> ApiSettings:
    settings: ApiSettings = request.app.state.settings
    return settings


def current_tenant(request: Request, authorization: Annotated[str | None, Header()] = None) -> str:
    """The tenant of the bearer key; 401 without a valid key."""
    if not authorization or not authorization.lower().startswith("bearer "):
        raise api_error(401, "no API key: send Authorization: Bearer <key>", "invalid_api_key")
    found = tenant_for_key(settings_of(request).db, authorization.split(" ", 1)[1].strip())
    if found is None:
        raise api_error(401, "invalid API key", "invalid_api_key")
    return found


Tenant = Annotated[str, Depends(current_tenant)]


def own_file(settings: ApiSettings, file_id: str, who: str) -> StoredFile:
    f = files.get_file(settings.db, file_id)
    if f is None or f.tenant != who:
        raise api_error(404, f"no file {file_id}", "not_found")
    return f


def own_batch(settings: ApiSettings, batch_id: str, who: str) -> Batch:
    b = batches.get_batch(settings.db, batch_id)
    if b is None or b.tenant != who:
        raise api_error(404, f"no batch {batch_id}", "not_found")
    return b
