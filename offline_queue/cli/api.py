"""`keys create | list | revoke` and `api serve`: the API keys tenants use (with their rights),
and the HTTP API (offline_queue/api/) under uvicorn."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from offline_queue.cli.shared import DbOption, err, use_prefect_defaults

api_app = typer.Typer(no_args_is_help=True, help="The OpenAI-compatible batch API.")
keys_app = typer.Typer(no_args_is_help=True, help="API keys (one tenant each).")

KEY_ID_CHARS = 12
"""A key's id in `keys list`: the start of its hash (the key itself is never stored)."""


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="The tenant the key acts for.")],
    tiers: Annotated[
        str | None,
        typer.Option(
            help="Tiers the key may use, e.g. critical,standard,bulk. Default: the "
            "server's (standard,bulk)."
        ),
    ] = None,
    max_weight: Annotated[
        int | None, typer.Option(help="Largest metadata.weight. Default: the server's (10).")
    ] = None,
    max_waiting: Annotated[
        int | None,
        typer.Option(help="Requests the tenant may have waiting. Default: the server's."),
    ] = None,
    max_stored_bytes: Annotated[
        int | None,
        typer.Option(help="Bytes the tenant's uploaded files may hold. Default: the server's."),
    ] = None,
    db: DbOption = None,
) -> None:
    """Make an API key for TENANT and print it (once: only its hash is stored)."""
    from offline_queue.api.auth import create_key
    from offline_queue.store.db import resolve_url

    try:
        key = create_key(
            resolve_url(db),
            tenant,
            tiers=tuple(t.strip() for t in tiers.split(",")) if tiers is not None else None,
            max_weight=max_weight,
            max_waiting=max_waiting,
            max_stored_bytes=max_stored_bytes,
        )
    except ValueError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc
    print(key)


@keys_app.command("list")
def keys_list(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's keys.")] = None,
    db: DbOption = None,
) -> None:
    """Every key: its id (for `keys revoke`), tenant, rights and whether it is revoked."""
    from offline_queue.store import keys
    from offline_queue.store.db import resolve_url

    def when(stamp: int | None) -> str:
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(stamp)) if stamp else "-"

    def value(v: object) -> str:
        return "default" if v is None else str(v)

    print("id\ttenant\tcreated\ttiers\tmax_weight\tmax_waiting\tmax_stored_bytes\trevoked")
    for row in keys.list_keys(resolve_url(db), tenant):
        fields = [
            row.key_hash[:KEY_ID_CHARS],
            row.tenant,
            when(row.created_at),
            value(row.tiers),
            value(row.max_weight),
            value(row.max_waiting),
            value(row.max_stored_bytes),
            when(row.revoked_at),
        ]
        print("\t".join(fields))


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id as `keys list` shows it.")],
    db: DbOption = None,
) -> None:
    """Revoke a key: from the next request on, it is a 401."""
    from offline_queue.store import keys
    from offline_queue.store.db import resolve_url

    if len(key_id) < 8 or any(c not in "0123456789abcdef" for c in key_id):
        err.print("[red]a key id is at least 8 hex digits, as `keys list` shows[/red]")
        raise typer.Exit(2)
    found = keys.revoke_keys(resolve_url(db), key_id)
    if len(found) != 1:
        err.print(
            f"[red]{'no live key has' if not found else 'more than one key has'} "
            f"the id {key_id}[/red]"
        )
        raise typer.Exit(1)
    print(f"revoked {key_id} (tenant {found[0].tenant})")


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
    lease_seconds: Annotated[
        float, typer.Option(help="A batch run here whose process died is reaped after this.")
    ] = 60.0,
    docs: Annotated[
        bool, typer.Option(help="Serve /docs, /redoc and /openapi.json (a key is still needed).")
    ] = False,
    metrics_host: Annotated[
        str, typer.Option(help="Address of the /metrics listener (Prometheus).")
    ] = "127.0.0.1",
    metrics_port: Annotated[
        int,
        typer.Option(help="Port of the /metrics listener, never the API's port; 0: none."),
    ] = 9464,
) -> None:
    """Serve /v1/files and /v1/batches (OpenAI's Batch API) for the `openai` SDK and curl, and
    GET /metrics for Prometheus on a listener of its own (--metrics-host, --metrics-port).
    Batches run here each on a thread of their own, unless --deployment starts them."""
    import platformdirs
    import uvicorn

    from offline_queue.api.app import create_app
    from offline_queue.api.settings import ApiSettings
    from offline_queue.store.db import resolve_url

    use_prefect_defaults()
    settings = ApiSettings(
        db=resolve_url(db),
        data_dir=data_dir or Path(platformdirs.user_data_dir("offline-queue")) / "api",
        engine=engine,
        deployment=deployment,
        lease_seconds=lease_seconds,
        docs=docs,
        metrics_host=metrics_host,
        metrics_port=metrics_port,
    )
    uvicorn.run(create_app(settings), host=host, port=port)
