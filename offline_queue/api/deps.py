"""What every route needs before it does anything: the caller's tenant and rights (the gate,
gate.py, found them from the bearer key before the body was read), the app's settings, and the
caller's own files and batches — another tenant's is a 404, exactly as if it did not exist."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

from fastapi import Depends, Request

from offline_queue.api.errors import api_error
from offline_queue.store import batches, files
from offline_queue.store.keys import KeyRights
from offline_queue.store.tables import Batch, StoredFile

if TYPE_CHECKING:
    from offline_queue.api.settings import ApiSettings

FILE_ID = re.compile(r"\Afile-[A-Za-z0-9_-]{1,59}\Z")
BATCH_ID = re.compile(r"\Abatch_[A-Za-z0-9_-]{1,58}\Z")
"""The ids this API hands out, and so the only ones it looks up: anything else (a NUL, 10 kB,
another charset) is a 404 before it reaches the store."""


@dataclass(frozen=True)
class Rights:
    """What the caller's key may do, the server's defaults filled in."""

    tenant: str
    tiers: tuple[str, ...]
    max_weight: int
    max_waiting: int
    max_stored_bytes: int


def settings_of(request: Request) -> ApiSettings:
    settings: ApiSettings = request.app.state.settings
    return settings


def current_rights(request: Request) -> Rights:
    stored: KeyRights | None = getattr(request.state, "rights", None)
    if stored is None:  # the gate lets no request through without a key
        raise api_error(401, "no API key: send Authorization: Bearer <key>", "invalid_api_key")
    s = settings_of(request)
    return Rights(
        tenant=stored.tenant,
        tiers=stored.tiers if stored.tiers is not None else s.default_tiers,
        max_weight=stored.max_weight if stored.max_weight is not None else s.default_max_weight,
        max_waiting=(
            stored.max_waiting if stored.max_waiting is not None else s.default_max_waiting
        ),
        max_stored_bytes=(
            stored.max_stored_bytes
            if stored.max_stored_bytes is not None
            else s.default_max_stored_bytes
        ),
    )


def current_tenant(rights: Annotated[Rights, Depends(current_rights)]) -> str:
    return rights.tenant


Tenant = Annotated[str, Depends(current_tenant)]
Caller = Annotated[Rights, Depends(current_rights)]


def own_file(settings: ApiSettings, file_id: str, who: str) -> StoredFile:
    if not FILE_ID.match(file_id):
        raise api_error(404, "no such file", "not_found")
    return _theirs(files.get_file(settings.db, file_id), who, f"no file {file_id}")


def own_batch(settings: ApiSettings, batch_id: str, who: str) -> Batch:
    if not BATCH_ID.match(batch_id):
        raise api_error(404, "no such batch", "not_found")
    found = batches.get_batch(settings.db, batch_id)
    if found is not None and found.source is not None:  # a stream's bookkeeping: not a batch
        found = None
    return _theirs(found, who, f"no batch {batch_id}")


Owned = TypeVar("Owned", StoredFile, Batch)


def _theirs(row: Owned | None, who: str, missing: str) -> Owned:
    """Another tenant's row is as missing as one that does not exist: the same 404, so that
    ids cannot be probed (an id not of the right form is not even echoed)."""
    if row is None or row.tenant != who:
        raise api_error(404, missing, "not_found")
    return row


def page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    """OpenAI's list object around one page of `data`."""
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }
