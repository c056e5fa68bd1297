"""`pools apply|show` and `worker start`: node groups as Prefect work pools (deployments/), and
the Prefect worker each node of a group runs."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from entrypoints.cli.shared import DbOption, err, out, use_prefect_defaults

if TYPE_CHECKING:
    from deployments.topology import Topology

pools_app = typer.Typer(no_args_is_help=True, help="Node groups as Prefect work pools.")
worker_app = typer.Typer(no_args_is_help=True, help="Workers: one per node.")

REPO_ROOT = Path(__file__).resolve().parents[2]
POOLS_FILE = REPO_ROOT / "deployments" / "pools.yaml"
PoolsFile = Annotated[
    Path, typer.Argument(help="The cluster file. Default: deployments/pools.yaml.")
]


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
    gpus: Annotated[
        int, typer.Option(min=1, help="GPUs on this node: the slots of its `gpu:` limit.")
    ] = 1,
) -> None:
    """`prefect worker start` for this node's group, with what a node needs set: the checkout
    the deployments' pull step moves to (OFFLINE_QUEUE_HOME), the engine environment, quick
    pick-up of new runs, and the node's GPU limit `gpu:GROUP:HOST` (GPUS slots), which the
    shards it runs hold while they serve. Arguments after `--` go to `prefect worker start`."""
    import socket

    from deployments.apply import node_gpu_limit, node_queue
    from flows.shard import GPU_GROUP_ENV, GPU_NODE_ENV
    from offline_queue.engines.env import apply_engine_env

    apply_engine_env()
    os.environ.setdefault("OFFLINE_QUEUE_HOME", str(REPO_ROOT))
    os.environ.setdefault("PREFECT_WORKER_QUERY_SECONDS", "2")
    use_prefect_defaults()
    if not os.environ.get("PREFECT_API_URL"):
        err.print("[yellow]PREFECT_API_URL is not set: a worker needs a Prefect server.[/yellow]")
    node = socket.gethostname()
    change = node_gpu_limit(group, node, gpus)
    out.print(f"{change.kind} {change.name}: {change.action} ({change.detail})")
    made, queues = node_queue(group, node)
    out.print(f"{made.kind} {made.name}: {made.action}; polling {', '.join(queues)}")
    os.environ.update({GPU_GROUP_ENV: group, GPU_NODE_ENV: node})  # the flow runs inherit it
    prefect = Path(sys.executable).with_name("prefect")
    args = [str(prefect), "worker", "start", "--pool", group, "--type", "process"]
    if name:
        args += ["--name", name]
    if queues and not {"-q", "--work-queue"} & set(ctx.args):  # the pool's and its own only
        for queue in queues:
            args += ["--work-queue", queue]
    if "--limit" not in ctx.args:  # its GPUs' shards, and one waiting to take a GPU over
        args += ["--limit", str(gpus + 1)]
    os.execv(args[0], [*args, *ctx.args])
