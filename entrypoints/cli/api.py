"""`keys create` and `api serve`: the API keys tenants use, and the HTTP API (entrypoints/api/)
under uvicorn."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from entrypoints.cli.shared import DbOption, use_prefect_defaults

api_app = typer.Typer(no_args_is_help=True, help="The OpenAI-compatible batch API.")
keys_app = typer.Typer(no_args_is_help=True, help="API keys (one tenant each).")


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="The tenant the key acts for.")],
    db: DbOption = None,
) -> None:
    """Make an API key for TENANT and print it (once: only its hash is stored)."""
    from entrypoints.api.auth import create_key
    from offline_queue.store.db import resolve_url

    print(create_key(resolve_url(db), tenant))


@api_app.command("serve")
def api_serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
    db: DbOption = None,
    engine: Annotated[
        str | None, typer.Option(help="Engine for batches run here (URL or block).")
    ] = None,
    deployment: Annotated[
        str | None,
        typer.Option(help="Start batches as runs of this deployment, e.g. route-batch/default."),
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="Uploads and results. Default: the user's data dir.")
    ] = None,
    workers: Annotated[int, typer.Option(help="Batches run at once in this process.")] = 1,
) -> None:
    """Serve /v1/files and /v1/batches (OpenAI's Batch API) for the `openai` SDK and curl."""
    import platformdirs
    import uvicorn

    from entrypoints.api.app import ApiSettings, create_app
    from offline_queue.store.db import resolve_url

    use_prefect_defaults()
    settings = ApiSettings(
        db=resolve_url(db),
        data_dir=data_dir or Path(platformdirs.user_data_dir("offline-queue")) / "api",
        engine=engine,
        deployment=deployment,
        workers=workers,
    )
    uvicorn.run(create_app(settings), host=host, port=port)
