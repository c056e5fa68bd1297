"""What the command groups share: the two consoles, the `--db` and `--json` options, the
environment a command that starts Prefect sets, and how a batch object is printed."""

from __future__ import annotations

import os
import time
from typing import Annotated

import orjson
import typer
from rich.console import Console
from rich.table import Table

from offline_queue.batch_object import BatchObject

out = Console()
err = Console(stderr=True, soft_wrap=True)  # messages name paths: never cut them mid-line

DbOption = Annotated[
    str | None,
    typer.Option(
        "--db",
        envvar="OFFLINE_QUEUE_DB",
        help="Store URL: postgresql+psycopg://user@host/db or sqlite:///path. "
        "Default: a SQLite file in the user's data directory.",
    ),
]
JsonOption = Annotated[
    bool, typer.Option("--json", help="Print the batch object as JSON (the last stdout line).")
]

# No network here, and a cold temporary Prefect server can take half a minute to start.
_PREFECT_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "PREFECT_LOGGING_LOG_PRINTS": "true",
}


def use_prefect_defaults() -> None:
    """Set them for this process and its children, unless the environment already says."""
    for key, value in _PREFECT_DEFAULTS.items():
        os.environ.setdefault(key, value)


def finish_text(batch: BatchObject) -> str:
    """The finish-time estimate in words, marked when it passes the batch's window."""
    e = batch.estimate
    if e is None:
        return "no estimate yet"
    when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(e.finish_at))
    rate = f"{e.requests_per_second:.2f} req/s, {e.requests_ahead} requests ahead"
    late = " [bold red]— after it expires[/bold red]" if e.late else ""
    return f"about {when} ({rate}){late}"


def print_batch(batch: BatchObject, as_json: bool) -> None:
    if as_json:
        print(orjson.dumps(batch.model_dump(mode="json")).decode(), flush=True)
        return
    counts = batch.request_counts
    table = Table(show_header=False, box=None)
    table.add_row("batch", batch.id)
    table.add_row("status", f"[bold]{batch.status}[/bold]")
    table.add_row(
        "requests", f"{counts.total} total, {counts.completed} completed, {counts.failed} failed"
    )
    table.add_row("tokens", f"{batch.usage.input_tokens} in, {batch.usage.output_tokens} out")
    for error in batch.errors.data if batch.errors else []:
        table.add_row("error", f"{error.code}: {error.message}")
    if batch.expires_at is not None:
        when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(batch.expires_at))
        table.add_row("expires", f"{when} ({batch.completion_window} window)")
    if batch.estimate is not None:
        table.add_row("finish", finish_text(batch))
    if batch.waiting_reason:
        table.add_row("waiting", batch.waiting_reason)
    if batch.engine_seconds:
        table.add_row("engine time", f"{batch.engine_seconds:.1f} s")
    if batch.run is not None:
        table.add_row("this run", f"{batch.run.inferred} inferred, {batch.run.reused} reused")
    if batch.model_version:
        table.add_row("model", batch.model_version)
    if batch.output_file:
        table.add_row("output", batch.output_file)
        table.add_row("errors", batch.error_file or "")
    out.print(table)
