"""`run` and `validate`: a batch file run to the end in this process through the Prefect flow,
or only checked."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Annotated

import orjson
import typer

from offline_queue.batch_object import BatchObject
from offline_queue.cli.shared import (
    DbOption,
    JsonOption,
    err,
    out,
    print_batch,
    use_prefect_defaults,
)
from offline_queue.states import Tier

if TYPE_CHECKING:
    from offline_queue.engines.vllm_local import VLLMSettings
    from offline_queue.findings import FileInfo

# Locations are text, not Paths: a Path would fold s3://bucket/key into s3:/bucket/key.
InputArgument = Annotated[
    str, typer.Argument(help="OpenAI Batch JSONL file: a path, or s3://… (any fsspec URL).")
]


def run(
    input: InputArgument,
    output: Annotated[str | None, typer.Option(help="Default: <input>.output.jsonl")] = None,
    errors: Annotated[str | None, typer.Option(help="Default: <input>.errors.jsonl")] = None,
    db: DbOption = None,
    model: Annotated[
        str | None, typer.Option(help="Model folder. Default: the bundled SmolLM2-135M.")
    ] = None,
    engine: Annotated[
        str | None,
        typer.Option(
            help="An OpenAI-compatible server (http://host:port/v1) or an engine block name. "
            "Default: vLLM in this process."
        ),
    ] = None,
    chunk_size: Annotated[int, typer.Option(min=1, help="Requests per task.")] = 256,
    batch_id: Annotated[
        str | None, typer.Option(help="Explicit id. Default: derived from the content.")
    ] = None,
    max_attempts: Annotated[
        int, typer.Option(min=1, help="Tries per request (retriable failures, lost workers).")
    ] = 3,
    tier: Annotated[Tier, typer.Option(help="Priority tier.")] = Tier.STANDARD,
    weight: Annotated[int, typer.Option(min=1, help="Share within the tier.")] = 1,
    lease_seconds: Annotated[
        float, typer.Option(help="A dead worker's chunk is claimed again after this long.")
    ] = 60.0,
    storage: Annotated[
        str | None,
        typer.Option(help="An offline-queue-storage block: credentials for s3:// (and others)."),
    ] = None,
    serve: Annotated[
        bool,
        typer.Option(
            help="Serve the batch with a loop in this process. --no-serve: only route, queue "
            "and wait; the serving loops of the cluster's nodes serve it."
        ),
    ] = True,
    as_json: JsonOption = False,
) -> None:
    """Run one batch to the end in this process, through the Prefect flow, served by a serving
    loop of this process (the same path as a node's, in one process).

    Running the same file again resumes it (or, once it is done, only rewrites the files)."""
    from offline_queue.model import ModelError, prepare_bundled_model
    from offline_queue.storage import locate
    from offline_queue.store.batches import BatchConflict
    from offline_queue.store.db import resolve_url
    from offline_queue.validate import FileRefused, Limits, inspect_file

    if storage:  # its credentials are needed to look at the input at all
        from offline_queue.blocks.storage import use_storage

        use_prefect_defaults()
        use_storage(storage)
    try:
        # refuse a bad file before starting anything (a store:// file is in the store we use)
        info = inspect_file(locate(input, resolve_url(db)), Limits())
        if not model and not engine:
            with err.status("Preparing the bundled model (once, ~20 s)…"):
                prepare_bundled_model()
    except (FileRefused, ModelError) as exc:
        err.print(f"[red]refused:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from exc
    use_prefect_defaults()
    from offline_queue.flows.batch import batch_inference
    from offline_queue.flows.waiting import SERVE_HERE_ENV
    from offline_queue.runs import BatchRun

    if serve:
        os.environ[SERVE_HERE_ENV] = "1"
    else:
        os.environ.pop(SERVE_HERE_ENV, None)

    if serve and not engine:  # vLLM here: its import and start overlap the Prefect server's
        from offline_queue.engines.vllm_local import start_in_background

        start_in_background(engine_ahead(info, model))

    batch_run = BatchRun(
        input=input,
        output=output,
        errors=errors,
        tier=tier,
        weight=weight,
        engine=engine,
        model=model,
        chunk_size=chunk_size,
        max_attempts=max_attempts,
        batch_id=batch_id,
        db=db,
        lease_seconds=lease_seconds,
        storage=storage,
        inspected=info,
    )
    try:
        result = batch_inference(**batch_run.parameters())
    except (FileRefused, BatchConflict) as exc:
        err.print(f"[red]refused:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from exc
    print_batch(BatchObject.model_validate(result), as_json)
    deliver_now(db)


def deliver_now(db: str | None) -> None:
    """The first attempt of what is due (this batch's ending) before the process exits; a
    retry is for whoever runs a dispatcher on the store later (the API, a node,
    `webhooks deliver`)."""
    import asyncio

    import httpx

    from offline_queue.store.db import resolve_url
    from offline_queue.webhooks import TIMEOUT_SECONDS, Dispatcher

    async def once() -> None:
        async with httpx.AsyncClient(timeout=TIMEOUT_SECONDS) as client:
            await Dispatcher(resolve_url(db)).once(client)

    try:
        asyncio.run(once())
    except Exception as exc:  # the batch is done; its event waits in the outbox
        err.print(f"webhooks not delivered yet: {exc}", highlight=False)


def engine_ahead(info: FileInfo, model: str | None) -> VLLMSettings | None:
    """The in-process engine the flow will ask for, when that is known before it starts: the
    model given, or the one the file's lines name in the catalog (when its entry is served in
    process, with no release to choose a track). None leaves the engine to the flow."""
    from offline_queue.blocks.catalog import catalog_here
    from offline_queue.blocks.engines import VLLM

    if model:
        return VLLM(model=model).settings()
    served = catalog_here().batch_model(info.named)
    if served is None or served.engine or served.release:
        return None
    return VLLM(model=served.model).settings()


def validate(
    input: InputArgument,
    show: Annotated[int, typer.Option(help="How many line errors to print.")] = 10,
    as_json: JsonOption = False,
) -> None:
    """Check a file without running it: counts, and the first errors with line and field."""
    from offline_queue.blocks.catalog import catalog_here
    from offline_queue.findings import Accepted
    from offline_queue.validate import FileRefused, Limits, inspect_file, validate_file

    limits = Limits()
    try:
        info = inspect_file(input, limits)
    except FileRefused as exc:
        err.print(f"[red]refused:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from exc
    accepted = rejected = 0
    shown: list[str] = []
    for item in validate_file(input, limits, catalog=catalog_here()):
        if isinstance(item, Accepted):
            accepted += 1
        else:
            rejected += 1
            if len(shown) < show:
                shown.append(item.error.message)
    if as_json:
        report = {"lines": info.lines, "accepted": accepted, "rejected": rejected, "errors": shown}
        print(orjson.dumps(report).decode())
        return
    for message in shown:
        err.print(message, highlight=False, markup=False)
    out.print(f"{accepted} accepted, {rejected} rejected, of {info.lines} lines")


def models(as_json: JsonOption = False) -> None:
    """The served models: names and aliases a batch's lines may use, and their endpoints."""
    from offline_queue.blocks.catalog import catalog_here

    rows = [
        {
            "id": m.name,
            "aliases": list(m.aliases),
            "endpoints": list(m.endpoints),
            "engine": m.engine or f"vllm in process ({m.model or 'bundled model'})",
        }
        for m in catalog_here().models
    ]
    if as_json:
        print(orjson.dumps(rows).decode())
        return
    for row in rows:
        aliases = ", ".join(row["aliases"]) or "-"
        endpoints = ", ".join(row["endpoints"])
        out.print(
            f"{row['id']}  aliases: {aliases}  endpoints: {endpoints}  engine: {row['engine']}"
        )
