"""The OpenAI-compatible batch API: /v1/files and /v1/batches, per-tenant API keys with rights,
limits and backpressure. The official `openai` SDK works against it unchanged.

This module assembles the app: its settings on `app.state`, the gate every request passes
before a route reads its body (gate.py: key, sizes, access log), the routes of files.py and
batches.py, and the handlers that put every error in OpenAI's shape (errors.py). Everything a
tenant sees is scoped to it (deps.py): another tenant's file or batch is a 404.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from pydantic import BaseModel, Field

from entrypoints.api import batches, files
from entrypoints.api.errors import install_error_handlers
from entrypoints.api.gate import Gate, access_log
from entrypoints.api.uploads import private_dir
from offline_queue.validate import Limits


class ApiSettings(BaseModel):
    db: str
    data_dir: Path
    engine: str | None = Field(default=None, description="Engine URL or block for local runs.")
    model: str | None = None
    deployment: str | None = Field(
        default=None,
        description="Start batches as runs of this deployment (e.g. route-batch/default) "
        "instead of in this process (a thread per batch).",
    )
    chunk_size: int = 256
    limits: Limits = Field(default_factory=Limits)
    max_queued: dict[str, int] = Field(
        default_factory=lambda: {"critical": 100_000, "standard": 2_000_000, "bulk": 10_000_000},
        description="Requests waiting per tier (all tenants) before a tenant past its share of "
        "the tier gets 429.",
    )
    max_json_bytes: int = Field(default=1 << 20, description="Largest JSON request body.")
    default_tiers: tuple[str, ...] = Field(
        default=("standard", "bulk"), description="Tiers of a key created without --tiers."
    )
    default_max_weight: int = Field(default=10, description="Weight cap of a key without one.")
    default_max_waiting: int = Field(
        default=1_000_000, description="Requests a tenant may have waiting, all tiers."
    )
    default_max_stored_bytes: int = Field(
        default=50 << 30, description="Bytes a tenant's uploaded files may hold."
    )
    docs: bool = Field(
        default=False, description="Serve /docs, /redoc, /openapi.json (with a key)."
    )
    access_log: Path | None = Field(default=None, description="Access log file; default stderr.")

    model_config = {"arbitrary_types_allowed": True}


def create_app(settings: ApiSettings) -> FastAPI:
    app = FastAPI(
        title="offline-queue",
        version="0.1.0",
        docs_url="/docs" if settings.docs else None,
        redoc_url="/redoc" if settings.docs else None,
        openapi_url="/openapi.json" if settings.docs else None,
    )
    app.state.settings = settings
    for directory in (
        settings.data_dir,
        settings.data_dir / "files",
        settings.data_dir / "outputs",
    ):
        private_dir(directory)
    access_log(settings)
    install_error_handlers(app)
    app.include_router(files.router)
    app.include_router(batches.router)
    app.add_middleware(Gate, settings=settings)
    return app
