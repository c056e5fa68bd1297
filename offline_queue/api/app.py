"""The OpenAI-compatible API — /v1/files, /v1/batches, /v1/models, /v1/responses and
/v1/chat/completions — with per-tenant keys, rights, limits and backpressure; the `openai` SDK
works against it unchanged. This module assembles the app (settings, gate, routes, error
handlers, /metrics) with the watch over lost runs and a webhook dispatcher beside it.
Everything a tenant sees is scoped to it (deps.py): another tenant's file or batch is a 404.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import Response

from offline_queue.api import batches, files, models, responses, runs
from offline_queue.api.errors import install_error_handlers
from offline_queue.api.gate import HEALTH, METRICS, Gate, access_log
from offline_queue.api.settings import ApiSettings
from offline_queue.webhooks import Dispatcher


def create_app(settings: ApiSettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
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

    if settings.metrics:

        @app.get(METRICS, include_in_schema=False)
        def metrics() -> Response:
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            from offline_queue.metrics import registry

            return Response(generate_latest(registry(settings.db)), media_type=CONTENT_TYPE_LATEST)

    app.include_router(files.router)
    app.include_router(batches.router)
    app.include_router(models.router)
    app.include_router(responses.router)
    app.add_middleware(Gate, settings=settings)
    return app
