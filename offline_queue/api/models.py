"""GET /v1/models and /v1/models/{model}: the names a batch's lines may give as `model`, from
the served-model catalog (offline_queue/catalog.py) — what the `openai` SDK's
`client.models.list()` asks first. Every name is listed, aliases too: each is a valid `model`."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel

from offline_queue.api.deps import Tenant
from offline_queue.api.errors import api_error
from offline_queue.blocks.catalog import catalog_here
from offline_queue.catalog import ServedModel

router = APIRouter()

OWNER = "offline-queue"


class ModelObject(BaseModel):
    """OpenAI's model object. `created` is 0: a served name has no creation time of its own."""

    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = OWNER


def _object(name: str, model: ServedModel) -> dict[str, Any]:
    return ModelObject(id=name).model_dump() | {"served_as": model.name}


@router.get("/v1/models")
def list_models(who: Tenant) -> dict[str, Any]:
    data = [_object(name, m) for m in catalog_here().models for name in m.names()]
    return {"object": "list", "data": data}


@router.get("/v1/models/{model}")
def get_model(model: str, who: Tenant) -> dict[str, Any]:
    catalog = catalog_here()
    found = catalog.find(model)
    if found is None:
        raise api_error(
            404,
            f"model {model!r} is not served; served: {catalog.served()}",
            "model_not_found",
            param="model",
        )
    return _object(model, found)
