"""`pools apply|show` and `worker start|loop|drain|loops`: node groups as Prefect work pools
(deployments/), and what each node of a group runs: the Prefect worker for the batches' flow
runs and a serving loop per GPU (docs/scheduling.md)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from offline_queue.cli.shared import DbOption, JsonOption, err, out, use_prefect_defaults

if TYPE_CHECKING:
    from offline_queue.pools.topology import Topology

pools_app = typer.Typer(no_args_is_help=True, help="Node groups as Prefect work pools.")
worker_app = typer.Typer(no_args_is_help=True, help="Workers: one per node.")

REPO_ROOT = Path(__file__).resolve().parents[2]
POOLS_FILE = REPO_ROOT / "deployments" / "pools.yaml"
PoolsFile = Annotated[
    Path, typer.Argument(help="The cluster file. Default: deployments/pools.yaml.")
]


def _load_topology(path: Path) -> Topology:
    from offline_queue.pools.topology import TopologyError, load_topology

    try:
        return load_topology(path)
    except TopologyError as exc:
        err.print(f"[red]refused:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from exc


@pools_app.command("apply")
def pools_apply(file: PoolsFile = POOLS_FILE, db: DbOption = None) -> None:
    """Create or update the work pools, tier queues and blocks of FILE.

    Idempotent: a second run changes nothing. The store URL (`--db`, else OFFLINE_QUEUE_DB,
    else this machine's SQLite default) is saved as the `offline-queue-store/default` block the
    deployments use: pass the cluster's PostgreSQL here."""
    from offline_queue.pools.apply import apply
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
    from offline_queue.pools.apply import show

    table = Table("pool", "pool limit", "queue", "priority", "queue limit", "workers")
    for r in show(_load_topology(file)):
        table.add_row(
            r.pool, str(r.pool_limit), r.queue, str(r.priority), str(r.queue_limit), str(r.workers)
        )
    out.print(table)


EngineOption = Annotated[
    str | None,
    typer.Option(help="Engine block or server URL. Default: the group's engine in the file."),
]
ModelOption = Annotated[str | None, typer.Option(help="Model (folder or bundled name).")]


@worker_app.command(
    "start", context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
)
def worker_start(
    ctx: typer.Context,
    group: Annotated[str, typer.Option(help="The node group (work pool) this node belongs to.")],
    name: Annotated[str | None, typer.Option(help="Worker name. Default: Prefect's.")] = None,
    gpus: Annotated[int, typer.Option(min=1, help="GPUs on this node.")] = 1,
    engine: EngineOption = None,
    model: ModelOption = None,
    db: DbOption = None,
    chunk_size: Annotated[int, typer.Option(min=1, help="Requests per claim.")] = 256,
    file: Annotated[Path, typer.Option(help="The cluster file.")] = POOLS_FILE,
) -> None:
    """What a node runs: a serving loop per GPU (per tensor-parallel group; one for a served
    engine), each its own process with CUDA_VISIBLE_DEVICES set to its GPUs and its engine
    loaded once, pulling work for the group's engine from the one queue; and `prefect worker
    start` for the group's pool, which runs the batches' flow runs (they hold no GPU).

    A loop that dies is started again; SIGTERM or Ctrl-C drains the loops (they finish what they
    hold) and stops the Prefect worker; both go with this process however it ends. Arguments
    after `--` go to `prefect worker start`."""
    import signal

    from offline_queue.engines.env import apply_engine_env
    from offline_queue.flows.waiting import SERVE_HERE_ENV
    from offline_queue.pools.node import Node, loop_commands

    apply_engine_env()
    os.environ.pop(SERVE_HERE_ENV, None)  # its flow runs wait for the loops
    os.environ.setdefault("OFFLINE_QUEUE_HOME", str(REPO_ROOT))
    os.environ.setdefault("PREFECT_WORKER_QUERY_SECONDS", "2")
    use_prefect_defaults()
    if not os.environ.get("PREFECT_API_URL"):
        err.print("[yellow]PREFECT_API_URL is not set: a worker needs a Prefect server.[/yellow]")
    engine = engine or _group_engine(file, group)
    # A group without an engine (the release router's) runs flows only: no loop.
    serves = engine is not None or model is not None
    loops = loop_commands(engine, model, gpus, db=db, chunk_size=chunk_size) if serves else []
    prefect = Path(sys.executable).with_name("prefect")
    args = [str(prefect), "worker", "start", "--pool", group, "--type", "process"]
    if name:
        args += ["--name", name]
    out.print(f"{len(loops)} serving loop(s) on {engine or 'vLLM in process'}")
    node = Node(loops, [*args, *ctx.args], lambda said: err.print(said, highlight=False))
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    node.supervise(lambda: stopping)
    node.stop()
    raise typer.Exit(0)


def _group_engine(file: Path, group: str) -> str | None:
    topology = _load_topology(file)
    spec = topology.groups.get(group)
    if spec is None:
        err.print(f"[red]refused:[/red] no group {group!r} in {file}", highlight=False)
        raise typer.Exit(2)
    return spec.engine.block if spec.engine is not None else None


@worker_app.command("loop")
def worker_loop(
    engine: EngineOption = None,
    model: ModelOption = None,
    db: DbOption = None,
    chunk_size: Annotated[int, typer.Option(min=1, help="Requests per claim.")] = 256,
    lease_seconds: Annotated[
        float, typer.Option(help="A dead loop's chunk is claimed again after this long.")
    ] = 60.0,
) -> None:
    """One serving loop in this process (what `worker start` runs per GPU): loads the engine
    once, then serves its route until drained (SIGTERM, `worker drain`). With a Prefect server
    it is a flow run (`serving-loop`) whose table artifact shows what it served."""
    from offline_queue.engines.env import apply_engine_env
    from offline_queue.flows.loop import node_loop, serving_loop
    from offline_queue.store.db import resolve_url

    apply_engine_env()
    use_prefect_defaults()
    if not os.environ.get("PREFECT_API_URL"):
        node_loop(engine, model, resolve_url(db), chunk_size, lease_seconds).serve()
        return
    # No --db nor OFFLINE_QUEUE_DB: the store block `pools apply` saved (the cluster's).
    store = None if db or os.environ.get("OFFLINE_QUEUE_DB") else "default"
    serving_loop(engine, model, db, store, chunk_size, lease_seconds)


@worker_app.command("drain")
def worker_drain(
    node: Annotated[
        str | None, typer.Option(help="The node whose loops drain. Default: this one.")
    ] = None,
    everywhere: Annotated[bool, typer.Option(help="Every node's loops.")] = False,
    db: DbOption = None,
) -> None:
    """Let a node's serving loops finish what they hold and claim nothing new (a rolling
    upgrade): they exit once their chunks are settled, and the rest of the cluster serves on."""
    import socket

    from offline_queue.store import loops
    from offline_queue.store.db import resolve_url

    n = loops.drain(resolve_url(db), None if everywhere else (node or socket.gethostname()))
    out.print(f"{n} serving loop(s) draining")


@worker_app.command("loops")
def worker_loops(db: DbOption = None, as_json: JsonOption = False) -> None:
    """The live serving loops: route, node, devices, what each has served; and the pending
    work per route and tier."""
    from dataclasses import asdict

    import orjson

    from offline_queue.store import loops
    from offline_queue.store.db import resolve_url

    url = resolve_url(db)
    live, pending = loops.live_loops(url), loops.pending(url)
    if as_json:
        print(orjson.dumps({"loops": [asdict(r) for r in live], "pending": pending}).decode())
        return
    table = Table("loop", "route", "node", "devices", "chunks", "requests", "state")
    for r in live:
        state = "draining" if r.draining else "serving"
        table.add_row(
            r.id, r.route, r.node, r.devices or "-", str(r.chunks), str(r.requests), state
        )
    out.print(table)
    for route, tier, n in pending:
        out.print(f"pending {route} {tier}: {n}")
