"""`offline-queue`: run a batch file, look at a batch, prepare the bundled model.

Heavy imports (Prefect, vLLM, transformers) happen inside the commands that need them, so
`status` answers in well under a second while a run is going on.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, cast

import orjson
import typer
from rich.console import Console
from rich.table import Table

from offline_queue.formats import BatchObject

if TYPE_CHECKING:
    from blocks.release import ReleasePolicy
    from deployments.topology import Topology
    from offline_queue.sources import BatchSource

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Batch LLM inference: OpenAI Batch JSONL in, one result per request out.",
)
model_app = typer.Typer(no_args_is_help=True, help="The model the in-process engine serves.")
app.add_typer(model_app, name="model")
engine_app = typer.Typer(no_args_is_help=True, help="Engines a GPU node keeps warm.")
app.add_typer(engine_app, name="engine")
pools_app = typer.Typer(no_args_is_help=True, help="Node groups as Prefect work pools.")
app.add_typer(pools_app, name="pools")
worker_app = typer.Typer(no_args_is_help=True, help="Workers: one per node.")
app.add_typer(worker_app, name="worker")

api_app = typer.Typer(no_args_is_help=True, help="The OpenAI-compatible batch API.")
app.add_typer(api_app, name="api")
keys_app = typer.Typer(no_args_is_help=True, help="API keys (one tenant each).")
app.add_typer(keys_app, name="keys")
release_app = typer.Typer(no_args_is_help=True, help="Gray release of model versions.")
app.add_typer(release_app, name="release")

REPO_ROOT = Path(__file__).resolve().parents[1]
POOLS_FILE = REPO_ROOT / "deployments" / "pools.yaml"
PoolsFile = Annotated[
    Path, typer.Argument(help="The cluster file. Default: deployments/pools.yaml.")
]

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


@model_app.command("prepare")
def model_prepare(
    directory: Annotated[
        Path | None, typer.Option("--dir", help="Where to put the converted model.")
    ] = None,
) -> None:
    """Convert the bundled SmolLM2-135M-Instruct GGUF into a folder vLLM loads (once; cached)."""
    from offline_queue.model import ModelError, prepare_bundled_model

    try:
        with err.status("Preparing the bundled model (once, ~20 s)…"):
            path = prepare_bundled_model(directory)
    except ModelError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    out.print(str(path), highlight=False)


@engine_app.command(
    "serve", context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
)
def engine_serve(
    ctx: typer.Context,
    model: Annotated[
        str | None, typer.Option(help="Model folder. Default: the bundled SmolLM2-135M.")
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    served_model_name: Annotated[
        str | None, typer.Option(help="Model name clients ask for. Default: the folder's name.")
    ] = None,
    ready_timeout: Annotated[float, typer.Option(help="Seconds to wait for /health.")] = 600,
) -> None:
    """Start vLLM's OpenAI-compatible server (`vllm serve`) and wait until it is healthy.

    Arguments after `--` go to `vllm serve` as they are. On the CPU build the settings that work
    there are added (float32, eager, a fixed KV cache). SIGTERM or Ctrl-C stops the server."""
    import signal

    from offline_queue.engines.vllm_server import ServerProcess, server_args
    from offline_queue.model import ModelError, resolve_model

    try:
        model_dir = resolve_model(model)
    except ModelError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    name = served_model_name or model_dir.name
    server = ServerProcess(server_args(model_dir, host, port, name, ctx.args), host, port)

    stopping: list[int] = []

    def stop(signum: int, _frame: object) -> None:
        # Only signal here: waiting on the child inside a handler can deadlock with the
        # main thread's own wait.
        stopping.append(signum)
        server.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.start()
    try:
        with err.status(f"Starting vllm serve for {name} on {host}:{port}…"):
            server.wait_ready(ready_timeout)
    except (RuntimeError, TimeoutError) as exc:
        server.stop()
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(0 if stopping else 1) from exc
    out.print(f"ready: {server.base_url}/v1 serving {name}", highlight=False)
    assert server.proc is not None
    while server.proc.poll() is None and not stopping:
        time.sleep(0.2)
    if stopping:
        err.print(f"stopping the server ({signal.Signals(stopping[0]).name})…")
        server.stop()
        raise typer.Exit(0)
    raise typer.Exit(server.proc.returncode)


def _load_topology(path: Path) -> Topology:
    from deployments.topology import TopologyError, load_topology

    try:
        return load_topology(path)
    except TopologyError as exc:
        err.print(f"[red]refused:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from exc


@pools_app.command("apply")
def pools_apply(file: PoolsFile = POOLS_FILE, db: DbOption = None) -> None:
    """Create or update the work pools, tier queues, GPU limits and blocks of FILE.

    Idempotent: a second run changes nothing. The store URL (`--db`, else OFFLINE_QUEUE_DB,
    else this machine's SQLite default) is saved as the `offline-queue-store/default` block the
    deployments use: pass the cluster's PostgreSQL here."""
    from deployments.apply import apply
    from offline_queue.store.db import resolve_url

    topology = _load_topology(file)  # all of it validated before anything is written
    table = Table("kind", "name", "action", "detail")
    changes = apply(topology, resolve_url(db))
    for c in changes:
        style = {"created": "green", "updated": "yellow"}.get(c.action, "dim")
        table.add_row(c.kind, c.name, f"[{style}]{c.action}[/{style}]", c.detail)
    out.print(table)
    changed = sum(1 for c in changes if c.action != "unchanged")
    out.print(f"{changed} changed, {len(changes) - changed} unchanged")


@pools_app.command("show")
def pools_show(file: PoolsFile = POOLS_FILE) -> None:
    """The live state of the node groups in FILE: pools, queues by priority, limits, workers."""
    from deployments.apply import show

    table = Table("pool", "pool limit", "queue", "priority", "queue limit", "gpu limit", "workers")
    for r in show(_load_topology(file)):
        table.add_row(
            r.pool,
            str(r.pool_limit),
            r.queue,
            str(r.priority),
            str(r.queue_limit),
            str(r.gpu_limit),
            str(r.workers),
        )
    out.print(table)


@worker_app.command(
    "start", context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
)
def worker_start(
    ctx: typer.Context,
    group: Annotated[str, typer.Option(help="The node group (work pool) this node belongs to.")],
    name: Annotated[str | None, typer.Option(help="Worker name. Default: Prefect's.")] = None,
) -> None:
    """`prefect worker start` for this node's group, with what a node needs set: the checkout
    the deployments' pull step moves to (OFFLINE_QUEUE_HOME), the engine environment, and
    quick pick-up of new runs. Arguments after `--` go to `prefect worker start`."""
    from offline_queue.engines.env import apply_engine_env

    apply_engine_env()
    os.environ.setdefault("OFFLINE_QUEUE_HOME", str(REPO_ROOT))
    os.environ.setdefault("PREFECT_WORKER_QUERY_SECONDS", "2")
    for key, value in _PREFECT_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if not os.environ.get("PREFECT_API_URL"):
        err.print("[yellow]PREFECT_API_URL is not set: a worker needs a Prefect server.[/yellow]")
    prefect = Path(sys.executable).with_name("prefect")
    args = [str(prefect), "worker", "start", "--pool", group, "--type", "process"]
    if name:
        args += ["--name", name]
    os.execv(args[0], [*args, *ctx.args])


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="The tenant the key acts for.")],
    db: DbOption = None,
) -> None:
    """Make an API key for TENANT and print it (once: only its hash is stored)."""
    from offline_queue.api.auth import create_key
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

    from offline_queue.api.app import ApiSettings, create_app
    from offline_queue.store.db import resolve_url

    for key, value in _PREFECT_DEFAULTS.items():
        os.environ.setdefault(key, value)
    settings = ApiSettings(
        db=resolve_url(db),
        data_dir=data_dir or Path(platformdirs.user_data_dir("offline-queue")) / "api",
        engine=engine,
        deployment=deployment,
        workers=workers,
    )
    uvicorn.run(create_app(settings), host=host, port=port)


PolicyOption = Annotated[
    str, typer.Option("--policy", help="Release policy block (one per model family).")
]


def _policy_block(name: str) -> ReleasePolicy:
    from blocks.release import load_policy

    try:
        return load_policy(name)
    except ValueError as exc:
        err.print(
            f"[red]error:[/red] no release policy {name!r}: `offline-queue release set` first"
        )
        raise typer.Exit(1) from exc


def _save_policy(block: ReleasePolicy, name: str, **changes: object) -> None:
    from pydantic import ValidationError

    from blocks.release import save_policy

    try:
        saved = save_policy(block, name, **changes)
    except (ValueError, ValidationError) as exc:
        err.print(f"[red]refused:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from exc
    _show_policy(saved, name)


def _show_policy(block: ReleasePolicy, name: str) -> None:
    table = Table(show_header=False, box=None, title=f"release policy {name}")
    for field in (
        "stable_version",
        "stable_engine",
        "candidate_version",
        "candidate_engine",
        "stage",
        "fraction",
        "sticky_by",
        "internal_tenants",
        "seed_groups",
        "max_error_rate_increase",
        "max_p95_latency_ratio",
        "min_samples",
    ):
        table.add_row(field, str(getattr(block, field)))
    out.print(table)


@release_app.command("set")
def release_set(
    policy: PolicyOption = "default",
    stable: Annotated[str | None, typer.Option(help="Stable model version.")] = None,
    stable_engine: Annotated[str | None, typer.Option(help="Engine block of stable.")] = None,
    candidate: Annotated[str | None, typer.Option(help="Candidate model version.")] = None,
    candidate_engine: Annotated[str | None, typer.Option(help="Engine block of candidate.")] = None,
    stage: Annotated[str | None, typer.Option(help="off|internal|seed|canary|full")] = None,
    fraction: Annotated[float | None, typer.Option(help="Canary share, 0..1.")] = None,
    sticky_by: Annotated[str | None, typer.Option(help="tenant|user_group|batch")] = None,
    internal_tenants: Annotated[str | None, typer.Option(help="Comma-separated.")] = None,
    seed_groups: Annotated[str | None, typer.Option(help="Comma-separated.")] = None,
    min_samples: Annotated[int | None, typer.Option(help="Guard minimum sample.")] = None,
) -> None:
    """Create or change a release policy (only the options given change)."""
    from blocks.release import ReleasePolicy

    changes = {
        k: v
        for k, v in {
            "stable_version": stable,
            "stable_engine": stable_engine,
            "candidate_version": candidate,
            "candidate_engine": candidate_engine,
            "stage": stage,
            "fraction": fraction,
            "sticky_by": sticky_by,
            "internal_tenants": internal_tenants.split(",") if internal_tenants else None,
            "seed_groups": seed_groups.split(",") if seed_groups else None,
            "min_samples": min_samples,
        }.items()
        if v is not None
    }
    try:
        block = _policy_block(policy)
    except typer.Exit:
        if not stable:
            raise
        block = ReleasePolicy(stable_version=stable)
    _save_policy(block, policy, **changes)


@release_app.command("show")
def release_show(policy: PolicyOption = "default") -> None:
    """The policy as it stands."""
    _show_policy(_policy_block(policy), policy)


@release_app.command("stage")
def release_stage(
    stage: Annotated[str, typer.Argument(help="off|internal|seed|canary|full")],
    policy: PolicyOption = "default",
) -> None:
    """Move the candidate to another stage."""
    _save_policy(_policy_block(policy), policy, stage=stage)


@release_app.command("set-fraction")
def release_set_fraction(
    fraction: Annotated[float, typer.Argument(help="Share of sticky keys on the candidate.")],
    policy: PolicyOption = "default",
) -> None:
    """Change the canary fraction."""
    _save_policy(_policy_block(policy), policy, fraction=fraction)


@release_app.command("promote")
def release_promote(policy: PolicyOption = "default") -> None:
    """The candidate becomes stable; every new batch goes to it."""
    block = _policy_block(policy)
    if not block.candidate_version:
        err.print("[red]refused:[/red] there is no candidate to promote")
        raise typer.Exit(2)
    _save_policy(
        block,
        policy,
        stable_version=block.candidate_version,
        stable_engine=block.candidate_engine,
        candidate_version=None,
        candidate_engine=None,
        stage="off",
        fraction=0.0,
    )


@release_app.command("rollback")
def release_rollback(policy: PolicyOption = "default") -> None:
    """Everything back to stable at once (candidate runs in flight finish)."""
    _save_policy(_policy_block(policy), policy, stage="off")


@release_app.command("route")
def release_route(
    key: Annotated[
        list[str] | None, typer.Option("--key", help="A sticky key (repeatable).")
    ] = None,
    keys_file: Annotated[Path | None, typer.Option(help="One key per line.")] = None,
    policy: PolicyOption = "default",
) -> None:
    """What the router would decide: `KEY TRACK VERSION REASON`, one line per key. A key
    stands for the tenant, the user group and the batch at once."""
    from offline_queue.release import RouteKey, route

    rules = _policy_block(policy).policy()
    keys = list(key or [])
    if keys_file:
        keys += [k.strip() for k in keys_file.read_text().splitlines() if k.strip()]
    for k in keys:
        d = route(rules, RouteKey(tenant=k, user_group=k, batch=k))
        print(f"{k} {d.track} {d.version} {d.reason}")


def _print_batch(batch: BatchObject, as_json: bool) -> None:
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
    if batch.run is not None:
        table.add_row("this run", f"{batch.run.inferred} inferred, {batch.run.reused} reused")
    if batch.model_version:
        table.add_row("model", batch.model_version)
    if batch.output_file:
        table.add_row("output", batch.output_file)
        table.add_row("errors", batch.error_file or "")
    out.print(table)


@app.command()
def run(
    input: Annotated[Path, typer.Argument(help="OpenAI Batch JSONL file.")],
    output: Annotated[Path | None, typer.Option(help="Default: <input>.output.jsonl")] = None,
    errors: Annotated[Path | None, typer.Option(help="Default: <input>.errors.jsonl")] = None,
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
    tier: Annotated[str, typer.Option(help="critical, standard or bulk.")] = "standard",
    weight: Annotated[int, typer.Option(min=1, help="Share within the tier.")] = 1,
    lease_seconds: Annotated[
        float, typer.Option(help="A dead worker's chunk is claimed again after this long.")
    ] = 60.0,
    as_json: JsonOption = False,
) -> None:
    """Run one batch to the end in this process, through the Prefect flow.

    Running the same file again resumes it (or, once it is done, only rewrites the files)."""
    from offline_queue.model import ModelError, prepare_bundled_model
    from offline_queue.store.batches import BatchConflict
    from offline_queue.validate import FileRefused, Limits, inspect_file

    try:
        inspect_file(input, Limits())  # refuse a bad file before starting anything
        if not model and not engine:
            with err.status("Preparing the bundled model (once, ~20 s)…"):
                prepare_bundled_model()
    except (FileRefused, ModelError) as exc:
        err.print(f"[red]refused:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from exc
    for key, value in _PREFECT_DEFAULTS.items():
        os.environ.setdefault(key, value)
    from flows.batch import batch_inference
    from offline_queue.runs import BatchRun, Tier

    run = BatchRun(
        input=str(input),
        output=str(output) if output else None,
        errors=str(errors) if errors else None,
        tier=cast(Tier, tier),
        weight=weight,
        engine=engine,
        model=model,
        chunk_size=chunk_size,
        max_attempts=max_attempts,
        batch_id=batch_id,
        db=db,
        lease_seconds=lease_seconds,
    )
    try:
        result = batch_inference(**run.parameters())
    except (FileRefused, BatchConflict) as exc:
        err.print(f"[red]refused:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from exc
    _print_batch(BatchObject.model_validate(result), as_json)


ApiOption = Annotated[
    str | None,
    typer.Option(
        "--api",
        envvar="OFFLINE_QUEUE_API",
        help="Batch API base URL (…/v1); the key is read from OFFLINE_QUEUE_API_KEY. "
        "Default: read the store directly.",
    ),
]
TERMINAL = ("completed", "failed", "cancelled", "expired")


def _source(api: str | None, db: str | None) -> BatchSource:
    from offline_queue.sources import ApiSource, StoreSource
    from offline_queue.store.db import resolve_url

    if api:
        return ApiSource(api, os.environ.get("OFFLINE_QUEUE_API_KEY"))
    return StoreSource(resolve_url(db))


def _found(batch: dict[str, Any] | None, batch_id: str) -> dict[str, Any]:
    if batch is None:
        err.print(f"[red]error:[/red] no batch {batch_id}", highlight=False)
        raise typer.Exit(1)
    return batch


@app.command()
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
        _print_batch(BatchObject.model_validate(_found(source.get(batch_id), batch_id)), as_json)
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


@app.command()
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
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
    ) as bar:
        task = bar.add_task(batch_id, total=None, rate="-")
        while True:
            counts = batch["request_counts"]
            tokens = batch["usage"]["output_tokens"] - first_tokens
            rate = tokens / max(time.monotonic() - started, 1e-9)
            bar.update(
                task,
                total=counts["total"] or None,
                completed=counts["completed"] + counts["failed"],
                rate=f"{rate:.1f}",
                description=f"{batch_id} {batch['status']}",
            )
            if batch["status"] in TERMINAL:
                break
            time.sleep(interval)
            batch = _found(source.get(batch_id), batch_id)
    _print_batch(BatchObject.model_validate(batch), False)


@app.command()
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


@app.command()
def cancel(
    batch_id: Annotated[str, typer.Argument(help="The batch to cancel.")],
    db: DbOption = None,
    api: ApiOption = None,
) -> None:
    """Stop a batch: queued requests are cancelled (in the error file), in-flight ones finish."""
    batch = _found(_source(api, db).cancel(batch_id), batch_id)
    out.print(f"{batch_id}: {batch['status']}", highlight=False)


@app.command()
def submit(
    input: Annotated[Path, typer.Argument(help="OpenAI Batch JSONL file.")],
    tier: Annotated[str, typer.Option(help="critical, standard or bulk.")] = "standard",
    wait: Annotated[
        bool, typer.Option(help="Follow it with a progress bar until it ends.")
    ] = False,
    api: ApiOption = None,
) -> None:
    """Submit a batch to the batch API and print its id (with --wait, follow it to the end).
    Without an API, use `offline-queue run` (it runs the batch in this process)."""
    from offline_queue.sources import ApiSource

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


@app.command()
def validate(
    input: Annotated[Path, typer.Argument(help="OpenAI Batch JSONL file.")],
    show: Annotated[int, typer.Option(help="How many line errors to print.")] = 10,
    as_json: JsonOption = False,
) -> None:
    """Check a file without running it: counts, and the first errors with line and field."""
    from offline_queue.validate import Accepted, FileRefused, Limits, inspect_file, validate_file

    limits = Limits()
    try:
        info = inspect_file(input, limits)
    except FileRefused as exc:
        err.print(f"[red]refused:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from exc
    accepted = rejected = 0
    shown: list[str] = []
    for item in validate_file(input, limits):
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


if __name__ == "__main__":
    app()
