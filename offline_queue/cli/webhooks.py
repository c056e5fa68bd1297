"""`webhooks add|list|remove|deliver`: where a tenant's events go (offline_queue/webhooks.py)."""

from __future__ import annotations

import contextlib
import json
from typing import Annotated

import typer
from rich.table import Table

from offline_queue.cli.shared import DbOption, JsonOption, err, out
from offline_queue.states import EventType

webhooks_app = typer.Typer(no_args_is_help=True, help="Signed webhooks when work ends.")

TenantOption = Annotated[
    str | None,
    typer.Option(help="Whose events. Empty: work sent without a tenant (the CLI's own runs)."),
]


@webhooks_app.command("add")
def add(
    url: Annotated[str, typer.Option(help="Where to POST the events (http or https).")],
    tenant: TenantOption = None,
    events: Annotated[
        list[EventType] | None,
        typer.Option("--events", help="Event types to send (repeat). Default: every one."),
    ] = None,
    retry_hours: Annotated[
        float, typer.Option(min=0, help="How long an undelivered event is retried.")
    ] = 24.0,
    db: DbOption = None,
) -> None:
    """Add an endpoint; prints its id and its signing secret (`whsec_…`), once."""
    import httpx

    from offline_queue.store import webhooks
    from offline_queue.store.db import resolve_url
    from offline_queue.webhooks import new_secret

    if httpx.URL(url).scheme not in ("http", "https"):
        err.print(f"[red]error:[/red] --url {url!r}: must be an http(s) URL")
        raise typer.Exit(2)
    secret = new_secret()
    endpoint = webhooks.add_endpoint(
        resolve_url(db), tenant, url, secret, list(events or EventType), retry_hours * 3600
    )
    out.print(f"id      {endpoint.id}", highlight=False)
    out.print(f"secret  {secret}", highlight=False)
    err.print("Keep the secret: it is not shown again (it verifies each delivery's signature).")


@webhooks_app.command("list")
def list_(
    tenant: TenantOption = None,
    every: Annotated[bool, typer.Option("--all", help="Every tenant's endpoints.")] = False,
    as_json: JsonOption = False,
    db: DbOption = None,
) -> None:
    """Endpoints (never their secrets)."""
    from offline_queue.store import webhooks
    from offline_queue.store.db import resolve_url

    rows = webhooks.endpoints(resolve_url(db), tenant, every)
    if as_json:
        fields = [
            {"id": e.id, "tenant": e.tenant, "url": e.url, "events": e.events.split(",")}
            for e in rows
        ]
        out.print_json(json.dumps(fields))
        return
    table = Table("id", "tenant", "url", "events")
    for e in rows:
        table.add_row(e.id, e.tenant or "-", e.url, e.events.replace(",", ", "))
    out.print(table)


@webhooks_app.command("remove")
def remove(endpoint_id: str, db: DbOption = None) -> None:
    """Remove an endpoint; its undelivered events are given up."""
    from offline_queue.store import webhooks
    from offline_queue.store.db import resolve_url

    if not webhooks.remove_endpoint(resolve_url(db), endpoint_id):
        err.print(f"[red]error:[/red] no webhook endpoint {endpoint_id}")
        raise typer.Exit(1)
    out.print(f"removed {endpoint_id}")


@webhooks_app.command("deliver")
def deliver(db: DbOption = None) -> None:
    """Deliver due events until stopped. The API and every node do it too: this is for a store
    nobody else serves."""
    import asyncio

    from offline_queue.store.db import resolve_url
    from offline_queue.webhooks import Dispatcher

    with err.status("Delivering webhooks (Ctrl-C stops)…"), contextlib.suppress(KeyboardInterrupt):
        asyncio.run(Dispatcher(resolve_url(db)).run())
