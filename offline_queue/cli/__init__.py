"""`offline-queue`, the command line. This module only assembles the commands; each group lives in
a module of its own (the list: docs/ARCHITECTURE.md, The parts of the code). Heavy imports
(Prefect, vLLM, transformers) happen inside the commands that need them, so `status` answers in
well under a second while a run is going on.
"""

from __future__ import annotations

import typer

from offline_queue.cli import (
    api,
    batches,
    cluster,
    engine,
    gpu_time,
    metrics,
    release,
    run,
    streams,
    webhooks,
)

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Batch LLM inference: OpenAI Batch JSONL in, one result per request out.",
)
for command in (
    run.run,
    batches.status,
    batches.watch,
    batches.results,
    batches.cancel,
    batches.submit,
    batches.cleanup,
    run.validate,
    run.models,
    gpu_time.gpu_time,
):
    app.command()(command)
app.add_typer(engine.model_app, name="model")
app.add_typer(engine.engine_app, name="engine")
app.add_typer(cluster.pools_app, name="pools")
app.add_typer(cluster.worker_app, name="worker")
app.add_typer(api.api_app, name="api")
app.add_typer(api.keys_app, name="keys")
app.add_typer(release.release_app, name="release")
app.add_typer(metrics.metrics_app, name="metrics")
app.add_typer(webhooks.webhooks_app, name="webhooks")
app.add_typer(streams.streams_app, name="streams")
