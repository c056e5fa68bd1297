"""The OpenAI-compatible batch API: /v1/files and /v1/batches, per-tenant API keys, limits and
backpressure. The official `openai` SDK works against it unchanged.

This module assembles the app: its settings and runner threads on `app.state`, the routes of
files.py and batches.py, and the handler that turns every HTTPException into OpenAI's error
shape. Everything a tenant sees is scoped to it (deps.py): another tenant's file or batch is a
404.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from entrypoints.api import batches, files
from offline_queue.states import Tier
from offline_queue.validate import Limits


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
    max_queued: dict[Tier, int] = Field(
        default_factory=lambda: {
            Tier.CRITICAL: 100_000,
            Tier.STANDARD: 2_000_000,
            Tier.BULK: 10_000_000,
        },
        description="Requests waiting per tier (all tenants) before new batches get 429.",
    )

    model_config = {"arbitrary_types_allowed": True}


async def _openai_errors(_: Request, exc: HTTPException) -> JSONResponse:
    body = exc.detail if isinstance(exc.detail, dict) else {"error": {"message": str(exc.detail)}}
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


def create_app(settings: ApiSettings) -> FastAPI:
    app = FastAPI(title="offline-queue", version="0.1.0")
    app.state.settings = settings
    app.state.runner = runner = ThreadPoolExecutor(
        max_workers=settings.workers, thread_name_prefix="batch"
    )
    app.exception_handler(HTTPException)(_openai_errors)
    app.include_router(files.router)
    app.include_router(batches.router)

    @app.on_event("shutdown")
    def _stop_runner() -> None:
        runner.shutdown(wait=False, cancel_futures=True)

    return app
