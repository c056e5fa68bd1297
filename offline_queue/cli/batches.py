"""`submit`, `status`, `watch`, `results`, `cancel`, `cleanup`: a batch seen through the batch API
(`--api`) or read from the store (`--db`); none of them needs a Prefect server."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import orjson
import typer
from rich.table import Table

from offline_queue.batch_object import BatchObject
from offline_queue.cli.shared import DbOption, JsonOption, err, out, print_batch
from offline_queue.states import TERMINAL_STATUSES, Tier

if TYPE_CHECKING:
    from offline_queue.cli.sources import BatchSource

ApiOption = Annotated[
    str | None,
    typer.Option(
        "--api",
        envvar="OFFLINE_QUEUE_API",
        help="Batch API base URL (…/v1); the key is read from OFFLINE_QUEUE_API_KEY. "
        "Default: read the store directly.",
    ),
]


def _source(api: str | None, db: str | None) -> BatchSource:
    from offline_queue.cli.sources import ApiSource, StoreSource
    from offline_queue.store.db import resolve_url

    if api:
        return ApiSource(api, os.environ.get("OFFLINE_QUEUE_API_KEY"))
    return StoreSource(resolve_url(db))


def _found(batch: dict[str, Any] | None, batch_id: str) -> dict[str, Any]:
    if batch is None:
        err.print(f"[red]error:[/red] no batch {batch_id}", highlight=False)
        raise typer.Exit(1)
    return batch


def status(
    batch_id: Annotated[
        str | None, typer.Argument(help="A batch id. None: recent batches.")
    ] = None,
    db: DbOption = None,
    api: ApiOption = None,
    as_json: JsonOption = False,
) -> None:
    """A batch's status and counts (read from the store or the API, no Prefect server needed);
    without an id, a table of recent batches."""
    source = _source(api, db)
    if batch_id:
        print_batch(BatchObject.model_validate(_found(source.get(batch_id), batch_id)), as_json)
        return
    batches = source.recent(20)
    if as_json:
        print(orjson.dumps(batches).decode())
        return
    rows = [
        (
            b["id"],
            b["status"],
            str(b["request_counts"]["total"]),
            str(b["request_counts"]["completed"]),
            str(b["request_counts"]["failed"]),
            time.strftime("%m-%d %H:%M", time.localtime(b["created_at"])),
        )
        for b in batches
    ]
    if not out.is_terminal:  # piped: whole words a script can split, never cut to a width
        for row in rows:
            print("\t".join(row))
        return
    table = Table("batch", "status", "total", "done", "failed", "created")
    for row in rows:
        table.add_row(*row)
    out.print(table)


def watch(
    batch_id: Annotated[str, typer.Argument(help="The batch to follow.")],
    db: DbOption = None,
    api: ApiOption = None,
    interval: Annotated[float, typer.Option(help="Seconds between looks.")] = 1.0,
) -> None:
    """A progress bar (requests done of total, output tok/s, ETA) until the batch ends."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    source = _source(api, db)
    batch = _found(source.get(batch_id), batch_id)
    started, first_tokens = time.monotonic(), batch["usage"]["output_tokens"]
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]} tok/s"),
        TextColumn("{task.fields[finish]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
    ) as bar:
        task = bar.add_task(batch_id, total=None, rate="-", finish="")
        while True:
            counts = batch["request_counts"]
            tokens = batch["usage"]["output_tokens"] - first_tokens
            rate = tokens / max(time.monotonic() - started, 1e-9)
            bar.update(
                task,
                total=counts["total"] or None,
                completed=counts["completed"] + counts["failed"],
                rate=f"{rate:.1f}",
                finish=_finish_column(batch),
                description=f"{batch_id} {batch['status']}",
            )
            if batch["status"] in TERMINAL_STATUSES:
                break
            time.sleep(interval)
            batch = _found(source.get(batch_id), batch_id)
    print_batch(BatchObject.model_validate(batch), False)


def _finish_column(batch: dict[str, Any]) -> str:
    e = batch.get("estimate")
    if not e:
        return ""
    late = " [red](late)[/red]" if e["late"] else ""
    return "finish ~" + time.strftime("%H:%M:%S", time.localtime(e["finish_at"])) + late


def results(
    batch_id: Annotated[str, typer.Argument(help="A finished batch.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the outputs.")],
    errors: Annotated[Path | None, typer.Option(help="Where to write the errors.")] = None,
    db: DbOption = None,
    api: ApiOption = None,
) -> None:
    """Fetch a finished batch's output (and error) file."""
    source = _source(api, db)
    batch = _found(source.get(batch_id), batch_id)
    try:
        size = source.download(batch, "output", output)
        out.print(f"{output} ({size} bytes)", highlight=False)
        if errors:
            size = source.download(batch, "errors", errors)
            out.print(f"{errors} ({size} bytes)", highlight=False)
    except FileNotFoundError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(1) from exc


def cancel(
    batch_id: Annotated[str, typer.Argument(help="The batch to cancel.")],
    db: DbOption = None,
    api: ApiOption = None,
) -> None:
    """Stop a batch: queued requests are cancelled (in the error file), in-flight ones finish."""
    batch = _found(_source(api, db).cancel(batch_id), batch_id)
    out.print(f"{batch_id}: {batch['status']}", highlight=False)


def cleanup(db: DbOption = None, as_json: JsonOption = False) -> None:
    """Remove what has expired: outputs of batches past their `output_expires_after`, uploaded
    files past their expiry, uploads that never finished. Says what it removed."""
    from offline_queue.expiry import remove_expired
    from offline_queue.store.db import resolve_url

    removed = remove_expired(resolve_url(db))
    if as_json:
        out.print_json(orjson.dumps(removed.__dict__).decode())
        return
    out.print(
        f"removed: outputs of {removed.batches} batches ({removed.output_files} files, "
        f"{removed.result_rows} result rows cleared), {removed.files} uploaded files",
        highlight=False,
    )


def submit(
    input: Annotated[Path, typer.Argument(help="OpenAI Batch JSONL file.")],
    tier: Annotated[Tier, typer.Option(help="Priority tier.")] = Tier.STANDARD,
    wait: Annotated[
        bool, typer.Option(help="Follow it with a progress bar until it ends.")
    ] = False,
    api: ApiOption = None,
) -> None:
    """Submit a batch to the batch API and print its id (with --wait, follow it to the end).
    Without an API, use `offline-queue run` (it runs the batch in this process)."""
    from offline_queue.cli.sources import ApiSource

    if not api:
        err.print("[red]error:[/red] submit needs --api (or OFFLINE_QUEUE_API); `run` runs locally")
        raise typer.Exit(2)
    source = ApiSource(api, os.environ.get("OFFLINE_QUEUE_API_KEY"))
    try:
        batch = source.submit(input, tier)
    except RuntimeError as exc:
        err.print(f"[red]refused:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from exc
    print(batch["id"])
    if wait:
        watch(batch["id"], api=api)
