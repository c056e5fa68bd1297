"""`metrics serve`: /metrics for a cluster that runs no API server. It reads the same store as
an API server's metrics listener (`api serve --metrics-port`, offline_queue/metrics.py), so
either or both can be scraped."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from offline_queue.cli.shared import DbOption

metrics_app = typer.Typer(no_args_is_help=True, help="Prometheus metrics from the store.")


@metrics_app.command("serve")
def serve(
    port: Annotated[int, typer.Option(help="Port of GET /metrics.")] = 9464,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    db: DbOption = None,
) -> None:
    """Serve GET /metrics on HOST:PORT until interrupted."""
    from offline_queue.blocks.catalog import catalog_here
    from offline_queue.metrics import listener
    from offline_queue.store.db import resolve_url

    with listener(resolve_url(db), host, port, catalog_here) as bound:
        print(f"metrics on http://{host}:{bound}/metrics", flush=True)
        while True:
            time.sleep(3600)
