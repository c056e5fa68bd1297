"""The OpenAI-compatible API — /v1/files, /v1/batches, /v1/models, /v1/responses and
/v1/chat/completions — with per-tenant keys, rights, limits and backpressure; the `openai` SDK
works against it unchanged. This module assembles the app (settings, gate, routes, error
handlers) with the watch over lost runs, a webhook dispatcher and the /metrics listener beside
it. Everything a tenant sees is scoped to it (deps.py): another tenant's file or batch is a 404.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from offline_queue.api import batches, files, models, responses, runs
from offline_queue.api.errors import install_error_handlers
from offline_queue.api.gate import HEALTH, Gate, access_log
from offline_queue.api.settings import ApiSettings
from offline_queue.blocks.catalog import catalog_here
from offline_queue.metrics import listener
from offline_queue.webhooks import Dispatcher


def metrics_listener(settings: ApiSettings) -> contextlib.AbstractContextManager[object]:
    """GET /metrics on a port of its own while the app runs (settings.metrics_port; 0: none)."""
    if not settings.metrics_port:
        return contextlib.nullcontext()
    return listener(settings.db, settings.metrics_host, settings.metrics_port, catalog_here)


def create_app(settings: ApiSettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        with metrics_listener(settings):
            watch = asyncio.create_task(runs.watch(settings.db))
            stop = asyncio.Event()
            deliveries = asyncio.create_task(Dispatcher(settings.db).run(stop))
            try:
                yield
            finally:
                watch.cancel()
                stop.set()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(deliveries, 15)
                from offline_queue.flows.waiting import release_kept_loops

                await asyncio.to_thread(release_kept_loops, settings.db)

    app = FastAPI(
        lifespan=lifespan,
        title="offline-queue",
        version="0.1.0",
        docs_url="/docs" if settings.docs else None,
        redoc_url="/redoc" if settings.docs else None,
        openapi_url="/openapi.json" if settings.docs else None,
    )
    app.state.settings = settings
    # Readable by this user only (the access log may live here).
    settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    settings.data_dir.chmod(0o700)
    access_log(settings)
    install_error_handlers(app)

    @app.get(HEALTH, include_in_schema=False)
    def health() -> dict[str, str]:
        return {"status": "ok"}

    app.include_router(files.router)
    app.include_router(batches.router)
    app.include_router(models.router)
    app.include_router(responses.router)
    app.add_middleware(Gate, settings=settings)
    return app
