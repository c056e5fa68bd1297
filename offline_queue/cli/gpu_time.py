"""`gpu-time`: GPU time per tenant and batch over a window, read from the store — what a team that
owns its GPUs bills and plans by (engine-seconds: offline_queue/gpu_time.py)."""

from __future__ import annotations

from typing import Annotated

import orjson
import typer
from rich.table import Table

from offline_queue.cli.shared import DbOption, JsonOption, err, out


def gpu_time(
    tenant: Annotated[
        str | None,
        typer.Option(help="One tenant (an API key's). `-` for batches run from the CLI."),
    ] = None,
    since: Annotated[
        str, typer.Option(help="The window: engine time used in the last 7d, 24h, 30m, …")
    ] = "7d",
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Engine-seconds each batch used in the window, by tenant, with totals."""
    from offline_queue.durations import duration_seconds
    from offline_queue.store import gpu_time as rows_of
    from offline_queue.store.db import resolve_url

    within = duration_seconds(since)
    if within is None:
        err.print(f"[red]error:[/red] --since {since!r}: a duration like 7d, 24h or 30m")
        raise typer.Exit(2)
    who = "" if tenant == "-" else tenant
    rows = rows_of.per_batch(resolve_url(db), who, within)
    if as_json:
        print(orjson.dumps([r.__dict__ for r in rows]).decode())
        return
    totals: dict[str, float] = {}
    for r in rows:
        totals[r.tenant] = totals.get(r.tenant, 0.0) + r.engine_seconds
    lines = [
        (
            r.tenant or "-",
            r.batch_id,
            r.tier,
            r.model_version,
            r.status,
            str(r.chunks),
            f"{r.engine_seconds:.1f}",
        )
        for r in rows
    ] + [(name or "-", "total", "", "", "", "", f"{s:.1f}") for name, s in sorted(totals.items())]
    if not out.is_terminal:  # piped: whole words a script can split, never cut to a width
        for line in lines:
            print("\t".join(line))
        return
    table = Table(
        "tenant", "batch", "tier", "model", "status", "chunks", "engine s", title=f"last {since}"
    )
    for line in lines:
        table.add_row(*line)
    out.print(table)
