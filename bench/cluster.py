"""Are N GPU nodes kept busy? Simulated GPU nodes (bench/simgpu.py), each in a network namespace
of its own (instruments.nodes) with its engine at its own 127.0.0.1:8000 and its own
`offline-queue worker start --gpus 1` (a Prefect worker, and one serving loop on the group's
served engine at the node's loopback); a real Prefect server and PostgreSQL on the host,
reached through Unix sockets; one bulk batch whose chunks every node's loop pulls.

    .venv/bin/python bench/cluster.py [--nodes 1,2,4,8,16] [--requests 1500] [--chunk-size 256]

`--requests` is per node (a run at N nodes has N × that many lines), so every run lasts about
as long. Nodes are added as N grows. Every loop serves the same route (the engine block's
name): the route names the kind of engine, each loop talks to its own node's server. Figures:

- `RESULT cluster_ratio_<N>`: steady-state throughput at N nodes ÷ at 1 node (target ≥ 0.9 N).
  Steady state: from the moment every engine has received its first request to the moment the
  batch has nothing left to claim; throughput is the engines' completions in that window.
- `RESULT engine_idle_fraction`: at the largest N, the share of each engine's time, from its
  first request until the batch had nothing left to claim, with nothing in flight (target ≤ 0.05).
  The engines record their own timelines.
- `RESULT critical_first_result_vs_chunk`: a critical batch started while bulk work holds every
  loop: its first committed result after its run was created ÷ one bulk chunk time (the 1-node
  run's median time between chunk commits). Target: seconds, and ≤ 1 + the flow run's start ÷
  chunk time (`RESULT critical_target_vs_chunk`, the start measured: run created → its first
  line queued, when the loops can claim it). Then both batches must finish with every
  custom_id exactly once (`RESULT critical_exactly_once`).
- The store's cost per loop at the largest N over the steady window, from PostgreSQL's
  pg_stat_statements (every statement the store's database ran, by kind), and the CPU each kind
  of process used (from /proc), which is what limits N on a small machine.

One file over 400 lines: one benchmark's phases (nodes up, steady window, critical batch, store
cost) sharing one cluster; the simulated engine is a room of its own (bench/simgpu.py).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from bench.plotting import PLOTS, pyplot  # noqa: E402
from instruments.nodes import Cluster, Node, namespaces_refused  # noqa: E402
from instruments.pools import apply_pools, deploy_tiers  # noqa: E402
from instruments.postgres import Postgres, create_database, postgres  # noqa: E402
from instruments.prefect_server import prefect_server  # noqa: E402
from instruments.processes import BIN, exit_on_sigterm, wait_for  # noqa: E402
from instruments.rows import batch_of as batch_row  # noqa: E402
from instruments.rows import result_times as commit_times  # noqa: E402

GROUP = "sim"
ENGINE_BLOCK = "sim-gpu"
ENGINE_PORT = 8000
TIERS = {"critical": 1, "standard": 2, "bulk": 3}
LOGS = REPO / "bench" / "out" / "cluster-logs"


def lines(path: Path, n: int, tag: str, max_tokens: int) -> Path:
    """n chat requests with distinct prompts (no cache hit carries work between runs)."""
    with path.open("w") as f:
        for i in range(n):
            body = {
                "model": "sim",
                "messages": [{"role": "user", "content": f"Tell me about item {tag}-{i}."}],
                "max_tokens": max_tokens,
                "temperature": 0,
            }
            line = {"custom_id": f"{tag}-{i}", "method": "POST", "url": "/v1/chat/completions"}
            f.write(json.dumps({**line, "body": body}) + "\n")
    return path


# -- the nodes -------------------------------------------------------------------------------


@dataclass
class SimNode:
    node: Node
    side: Path
    """The engine's side endpoint (a Unix socket the host sees)."""

    @property
    def name(self) -> str:
        return self.node.name

    def get(self, what: str) -> Any:
        transport = httpx.HTTPTransport(uds=str(self.side))
        with httpx.Client(transport=transport, timeout=30) as client:
            return client.get(f"http://engine/{what}").json()


def start_node(
    machines: Cluster,
    i: int,
    env: dict[str, str],
    prefect_port: int,
    cluster_file: Path,
    store: str,
    chunk_size: int,
) -> SimNode:
    """A node with its own netns: the Prefect server forwarded to its 127.0.0.1, its engine on
    127.0.0.1:8000, and its `worker start` (one GPU: one serving loop, and a Prefect worker)."""
    node = machines.node(f"sim-{i}", netns=True, reach=[prefect_port])
    side = machines.dir / f"sim-{i}-engine.sock"
    engine = node.popen(
        [sys.executable, "-m", "bench.simgpu", "--port", str(ENGINE_PORT), "--side", str(side)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
    )
    assert engine.stdout is not None and engine.stdout.readline().strip() == b"ready"
    LOGS.mkdir(parents=True, exist_ok=True)
    log = (LOGS / f"sim-{i}-worker.log").open("wb")  # its loop's and flow runs' output too
    worker = [str(BIN / "offline-queue"), "worker", "start", "--group", GROUP, "--gpus", "1"]
    worker += ["--file", str(cluster_file), "--db", store, "--chunk-size", str(chunk_size)]
    node.popen(
        worker,
        env=node.env(env, PREFECT_LOGGING_LEVEL="INFO"),  # when each run was picked up, started
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    return SimNode(node, side)


def nodes_online(n: int, store: str) -> bool:
    """`n` Prefect workers online and `n` serving loops live (their rows in `serving_loops`)."""
    from prefect.client.orchestration import get_client

    from offline_queue.store import loops

    with get_client(sync_client=True) as client:
        workers = client.read_workers_for_work_pool(GROUP)
    online = sum(1 for w in workers if w.status == "ONLINE")
    return online >= n and len(loops.live_loops(store)) >= n


def set_up(machines: Cluster, env: dict[str, str], store: str) -> Path:
    """The cluster file (one group whose engine is each node's own simulated server; a batch's
    flow run holds no GPU, so a few runs at once are room enough), its engine block and one
    deployment per tier; the file, for the nodes' `worker start`."""
    engine = {
        "block": f"openai-server/{ENGINE_BLOCK}",
        "type": "openai-server",
        "base_url": f"http://127.0.0.1:{ENGINE_PORT}/v1",
        "max_in_flight": 64,
    }
    topology = {
        "tiers": {t: {"priority": p, "concurrency_limit": 4} for t, p in TIERS.items()},
        "groups": {GROUP: {"concurrency_limit": 8, "engine": engine}},
    }
    cluster_file = apply_pools(topology, machines.dir, store, env)
    deploy_tiers(topology, db=store, engine=engine["block"])
    return cluster_file


def all_serving(sims: list[SimNode], began: float, args: argparse.Namespace) -> None:
    """Once every engine has had a request since `began`, or after `--all-serving-seconds` (a
    loop that has not claimed yet then counts as an idle engine)."""
    wait_for(
        lambda: (
            time.time() - began > args.all_serving_seconds
            or all((s.get("stats")["last"] or 0) > began for s in sims)
        ),
        900,
        0.5,
    )


def start_run(tier: str, path: Path) -> UUID:
    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments import run_deployment

    started: FlowRun = run_deployment(  # type: ignore[assignment]  # sync: not a coroutine
        f"batch-inference/{GROUP}-{tier}", parameters={"input": str(path)}, timeout=0
    )
    return started.id


# -- what is measured ------------------------------------------------------------------------


class StoreStats:
    """pg_stat_statements of the store's database: calls per kind of statement."""

    KINDS = [
        ("claim", r"for update skip locked"),
        ("batch clock", r"update batches set .*vtime|min\(batches\.vtime\)"),
        ("loop beat", r"update serving_loops"),
        ("loop lookup", r"from serving_loops"),
        ("owner heartbeat", r"update batches set owner"),
        ("lease renewal", r"update requests set lease_expires"),
        ("progress count", r"group by requests\.state|count\(\*\).*from results"),
        ("settle", r"insert into results|update requests set state"),
        ("engine time", r"insert into engine_time"),
        ("result cache", r"result_cache"),
        ("batch read", r"^select .* from batches"),
        ("pool pre-ping", r"^select 1$"),
        ("transaction", r"^(begin|commit|rollback)"),
    ]

    def __init__(self, url: str, database: str):
        self.url, self.database = url.replace("postgresql+psycopg://", "postgresql://"), database

    def snapshot(self) -> Counter[str]:
        """Calls so far by statement text."""
        import psycopg

        with psycopg.connect(f"{self.url}/{self.database}", autocommit=True) as conn:
            rows = conn.execute(
                "SELECT query, calls FROM pg_stat_statements s JOIN pg_database d "
                "ON d.oid = s.dbid WHERE d.datname = %s",
                (self.database,),
            ).fetchall()
        found: Counter[str] = Counter()
        for query, calls in rows:
            found[query] += calls
        return found

    @classmethod
    def by_kind(cls, calls: Counter[str]) -> Counter[str]:
        kinds: Counter[str] = Counter()
        for query, n in calls.items():
            kinds[cls.kind(query)] += n
        return kinds

    @classmethod
    def kind(cls, query: str) -> str:
        q = re.sub(r"\s+", " ", query.strip().lower()).replace('"', "")
        for name, pattern in cls.KINDS:
            if re.search(pattern, q):
                return name
        return "other"


def cpu_by_role(machines: Cluster) -> dict[int, tuple[str, float, int]]:
    """Every process's role, CPU seconds so far and RSS (bytes): the nodes' and the host's."""
    node_pids = {p: n.name for n in machines.nodes for p in n.pids()}
    tick, page = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        role = role_of(cmd, pid in node_pids)
        if role is None:
            continue
        cpu = (int(stat[11]) + int(stat[12])) / tick
        found[pid] = (role, cpu, int(stat[21]) * page)
    return found


def role_of(cmd: str, in_node: bool) -> str | None:
    if "bench.simgpu" in cmd:
        return "engine (simulated)"
    if "instruments.bridge" in cmd:
        return "bridge in a node" if in_node else "bridge on the host"
    if in_node and "worker loop" in cmd:
        return "serving loop"
    if in_node and "worker start --group" in cmd:
        return "worker start"
    if in_node and "worker start --pool" in cmd:
        return "Prefect worker"
    if in_node and ("prefect.engine" in cmd or "flow_run" in cmd or "-m prefect" in cmd):
        return "flow run"
    if in_node and "python" in cmd:
        return "other in a node: " + cmd[:60]
    if "prefect server start" in cmd or ("uvicorn" in cmd and "prefect" in cmd):
        return "Prefect server"
    if cmd.startswith("postgres") or "/postgres " in cmd or cmd.startswith("/usr/lib/postgresql"):
        return "PostgreSQL"
    if cmd.startswith(("postgres:", "postgres ")):
        return "PostgreSQL"
    if str(Path(__file__).name) in cmd:
        return "benchmark driver"
    return None


def cpu_report(before: dict, after: dict, seconds: float) -> list[str]:
    per_role: dict[str, list[float]] = defaultdict(list)
    rss: dict[str, list[int]] = defaultdict(list)
    for pid, (role, cpu, mem) in after.items():
        start = before.get(pid, (role, 0.0, 0))[1]
        per_role[role].append((cpu - start) / seconds)
        rss[role].append(mem)
    out = []
    for role, cores in sorted(per_role.items(), key=lambda kv: -sum(kv[1])):
        out.append(
            f"  {role:<24} {len(cores):3d} processes  {sum(cores):5.2f} cores in all, "
            f"{max(cores):4.2f} the busiest, {max(rss[role]) / 2**20:5.0f} MB RSS the largest"
        )
    return out


@dataclass
class Run:
    nodes: int
    rate: float = 0.0
    window: float = 0.0
    idle: float = 0.0
    in_flight: float = 0.0
    """Requests in flight at an engine on average while it had any."""
    chunk_seconds: float | None = None
    queries: dict[str, float] = field(default_factory=dict)
    statements: list[tuple[float, str]] = field(default_factory=list)
    cpu: list[str] = field(default_factory=list)
    wall: float = 0.0
    spread: float = 0.0
    """Seconds from the batch's run to every engine serving it."""
    never: int = 0
    """Engines that got no request of the batch."""


def occupancy(
    arrivals: list[float], completions: list[float], start: float, end: float
) -> tuple[float, float]:
    """From the engine's own timeline: seconds in [start, end] with nothing in flight, and the
    request-seconds in flight in that span."""
    events = sorted([(t, 1) for t in arrivals] + [(t, -1) for t in completions])
    level = sum(d for t, d in events if t < start)
    idle, load, last = 0.0, 0.0, start
    for t, d in events:
        if t < start:
            continue
        if t > end:
            break
        if level == 0:
            idle += t - last
        load += level * (t - last)
        level += d
        last = t
    if level == 0:
        idle += max(0.0, end - last)
    load += level * max(0.0, end - last)
    return idle, load


def exactly_once(batch: Any, n: int, tag: str) -> bool:
    seen: Counter[str] = Counter()
    for path in (batch.output_path, batch.error_path):
        if path and Path(path).exists():
            seen.update(json.loads(x)["custom_id"] for x in Path(path).read_text().splitlines())
    return set(seen.values()) == {1} and set(seen) == {f"{tag}-{i}" for i in range(n)}


def drained(store: str, path: Path) -> Any:
    """The batch's row once it has nothing left to claim (ingest over, none queued); else None."""
    from offline_queue.store import results

    batch = batch_row(store, path)
    if batch is None or not batch.ingest_done:
        return None
    return batch if results.progress(store, batch.id).queued == 0 else None


def final(store: str, path: Path) -> Any:
    """The batch's row once it is over; else None."""
    batch = batch_row(store, path)
    return batch if batch is not None and batch.status in ("completed", "failed") else None


def measure(
    n: int,
    sims: list[SimNode],
    machines: Cluster,
    store: str,
    stats: StoreStats,
    args: argparse.Namespace,
) -> Run:
    total = n * args.requests
    path = lines(machines.dir / f"bulk-{n}.jsonl", total, f"n{n}", args.max_tokens)
    began = time.time()
    start_run("bulk", path)
    all_serving(sims, began, args)  # the steady window opens here
    opened = time.time()
    queries_before, cpu_before = stats.snapshot(), cpu_by_role(machines)
    batch = wait_for(lambda: drained(store, path), 3600, 0.5)
    closed = time.time()
    queries_after, cpu_after = stats.snapshot(), cpu_by_role(machines)
    done = wait_for(lambda: final(store, path), 900, 1)
    assert done.status == "completed", (done.status, done.errors_json)
    assert exactly_once(done, total, f"n{n}"), f"run at {n} nodes: not every custom_id once"
    window = closed - opened
    completions = idle = spans = load = 0.0
    never = 0
    for sim in sims:
        timeline = sim.get("timeline")
        arrivals = [t for t in timeline["arrivals"] if t >= began]
        ends = [t for t in timeline["completions"] if t >= began]
        completions += sum(1 for t in ends if opened <= t <= closed)
        never += not arrivals
        empty, busy_load = occupancy(arrivals, ends, opened, closed)
        idle, load, spans = idle + empty, load + busy_load, spans + closed - opened
    run = Run(n, rate=completions / window, window=window, idle=idle / spans)
    run.spread, run.never = opened - began, never
    run.in_flight = load / max(spans - idle, 1e-9)
    run.wall = (done.completed_at or time.time()) - began
    if n == 1:
        times = commit_times(store, batch.id)
        gaps = [b - a for a, b in itertools.pairwise(times)]
        run.chunk_seconds = statistics.median(gaps) if gaps else None
    calls = queries_after - queries_before
    run.queries = {k: v / window / n for k, v in StoreStats.by_kind(calls).items()}
    run.statements = [
        (v / window / n, re.sub(r"\s+", " ", q)[:110]) for q, v in calls.most_common(8)
    ]
    run.cpu = cpu_report(cpu_before, cpu_after, window)
    print(
        f"{n} node(s): {run.rate:.1f} req/s steady over {window:.0f} s "
        f"({run.rate / n:.1f} per node), engines idle {100 * run.idle:.1f} % of their time "
        f"and {run.in_flight:.0f} in flight on average when not, "
        f"batch of {total} in {run.wall:.0f} s; every engine serving {run.spread:.0f} s after the "
        f"run started; {run.never} engine(s) never served",
        flush=True,
    )
    return run


@dataclass
class Critical:
    first_vs_chunk: float
    target_vs_chunk: float
    once: bool
    detail: str


def critical(
    n: int,
    sims: list[SimNode],
    machines: Cluster,
    store: str,
    chunk_seconds: float,
    args: argparse.Namespace,
) -> Critical:
    """A critical batch while bulk work holds every loop; both must finish, every custom_id
    once."""
    from offline_queue.store import results

    n_bulk = n * max(args.requests, args.chunk_size * 8)  # outlasts a flow run's start
    bulk = lines(machines.dir / "crit-bulk.jsonl", n_bulk, "cb", args.max_tokens)
    crit = lines(machines.dir / "crit.jsonl", args.critical_requests, "cc", args.max_tokens)
    began = time.time()
    start_run("bulk", bulk)
    all_serving(sims, began, args)
    time.sleep(chunk_seconds * 1.3)  # into the loops' second chunks, off their boundaries
    arrived = time.time()
    start_run("critical", crit)
    found = wait_for(lambda: batch_row(store, crit), 300, 0.05)
    assert found is not None  # wait_for returns only what is there
    row = found

    def queued() -> float | None:
        p = results.progress(store, row.id)
        return time.time() if p.pending + p.completed + p.failed else None

    queued_at: float = wait_for(queued, 300, 0.05)  # type: ignore[assignment]  # never None
    first: float = wait_for(lambda: min(commit_times(store, row.id), default=0.0), 600, 0.2)

    crit_done = wait_for(lambda: final(store, crit), 900, 1)
    bulk_done = wait_for(lambda: final(store, bulk), 1800, 1)
    bulk_after = [t for t in commit_times(store, bulk_done.id) if t > arrived]
    checks = {
        "both completed": crit_done.status == bulk_done.status == "completed",
        "critical: every custom_id once": exactly_once(crit_done, args.critical_requests, "cc"),
        "bulk: every custom_id once": exactly_once(bulk_done, n_bulk, "cb"),
        "bulk resumed after the critical batch": bool(bulk_after)
        and bulk_after[-1] > commit_times(store, crit_done.id)[-1],
    }
    print("; ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in checks.items()), flush=True)
    once = all(checks.values())
    start = queued_at - arrived
    detail = (
        f"critical at {n} nodes: its first line queued {start:.1f} s after its run was "
        f"created; first result {first - arrived:.1f} s after; a bulk chunk takes "
        f"{chunk_seconds:.1f} s; bulk finished {bulk_done.completed_at - arrived:.0f} s after"
    )
    print(detail, flush=True)
    return Critical((first - arrived) / chunk_seconds, 1 + start / chunk_seconds, once, detail)


def plot(runs: list[Run], idle: float) -> None:
    from bench.simgpu import rate

    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    base = runs[0].rate / runs[0].nodes
    ns = [r.nodes for r in runs]
    left.plot(ns, [r.rate for r in runs], "o-", label="measured")
    left.plot(ns, [base * n for n in ns], ":", label="N × one node")
    left.plot(ns, [0.9 * base * n for n in ns], "--", label="target 0.9 × N")
    left.set_xlabel("simulated GPU nodes")
    left.set_ylabel("steady requests/s")
    left.set_title(f"One batch over N nodes (engines idle {100 * idle:.1f} % at N={ns[-1]})")
    left.legend()
    flights = list(range(1, 129))
    right.plot(flights, [rate(f) for f in flights])
    right.set_xlabel("requests in flight at one engine")
    right.set_ylabel("requests/s (16-token answers)")
    right.set_title("The simulated engine: knee at max_num_seqs 64")
    fig.tight_layout()
    fig.savefig(PLOTS / "cluster.png", dpi=120)


@contextlib.contextmanager
def services(tmp: Path) -> Iterator[tuple[Postgres, dict[str, str], str]]:
    with postgres("shared_preload_libraries=pg_stat_statements", "max_connections=400") as pg:
        store_db = "oq_cluster_store"
        create_database(pg.url, store_db)
        import psycopg

        plain = pg.url.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(f"{plain}/{store_db}", autocommit=True) as conn:
            conn.execute("CREATE EXTENSION pg_stat_statements")
        with prefect_server(
            tmp / "prefect", database_url=create_database(pg.url, "prefect_cluster")
        ) as env:
            yield pg, env, store_db


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", default="1,2,4,8,16")
    parser.add_argument("--requests", type=int, default=1500, help="per node")
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--critical-requests", type=int, default=64)
    parser.add_argument("--no-critical", action="store_true")
    parser.add_argument(
        "--all-serving-seconds",
        type=float,
        default=60.0,
        help="the steady window opens then at the latest, every engine serving or not",
    )
    args = parser.parse_args()
    exit_on_sigterm()
    refused = namespaces_refused()
    if refused:
        sys.exit(f"simulated nodes need namespaces: {refused}")
    counts = sorted({int(x) for x in args.nodes.split(",")})
    with (
        tempfile.TemporaryDirectory(prefix="oq-cluster-") as tmp,
        services(Path(tmp)) as (pg, env, store_db),
        Cluster() as machines,
    ):
        os.environ["PREFECT_API_URL"] = env["PREFECT_API_URL"]
        prefect_port = int(env["PREFECT_API_URL"].rsplit(":", 1)[1].split("/")[0])
        store = pg.socket_url(store_db)  # what the nodes reach (no TCP into their netns)
        env = {**env, "PREFECT_WORKER_QUERY_SECONDS": "1"}
        cluster_file = set_up(machines, env, store)
        stats = StoreStats(pg.url, store_db)
        sims: list[SimNode] = []
        runs: list[Run] = []
        for n in counts:
            started = time.monotonic()
            while len(sims) < n:
                i = len(sims) + 1
                sims.append(
                    start_node(machines, i, env, prefect_port, cluster_file, store, args.chunk_size)
                )
            wait_for(lambda n=n: nodes_online(n, store), 600, 1)  # type: ignore[misc]
            print(f"{n} node(s) up in {time.monotonic() - started:.0f} s", flush=True)
            runs.append(measure(n, sims, machines, store, stats, args))
        top = runs[-1]
        chunk = runs[0].chunk_seconds or args.chunk_size / (top.rate / top.nodes)
        crit = None if args.no_critical else critical(top.nodes, sims, machines, store, chunk, args)
    base = runs[0].rate / runs[0].nodes
    print(f"\nstore statements per loop per second at {top.nodes} nodes (pg_stat_statements):")
    for kind, rate in sorted(top.queries.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:<16} {rate:7.2f}/s")
    per_loop = sum(top.queries.values())
    print(f"  {'all':<16} {per_loop:7.2f}/s for {top.rate / top.nodes:.1f} requests/s a loop")
    print("the most frequent statements, per loop per second:")
    for rate, text in top.statements:
        print(f"  {rate:7.2f}/s  {text}")
    print(f"\nCPU over the steady window at {top.nodes} nodes (2 cores on this machine):")
    print("\n".join(top.cpu))
    if len(runs) > 1:  # one node count (a critical-batch run) leaves the scaling plot as it is
        plot(runs, top.idle)
    for r in runs:
        print(f"RESULT cluster_ratio_{r.nodes} {r.rate / base:.2f}")
        print(f"RESULT cluster_req_per_s_{r.nodes} {r.rate:.1f}")
        print(f"RESULT cluster_all_serving_s_{r.nodes} {r.spread:.1f}")
    print(f"RESULT engine_idle_fraction {top.idle:.3f}")
    print(f"RESULT store_statements_per_loop_per_s {per_loop:.1f}")
    print(f"RESULT store_statements_per_request {per_loop / (top.rate / top.nodes):.3f}")
    if crit is not None:
        print(f"RESULT critical_first_result_vs_chunk {crit.first_vs_chunk:.2f}")
        print(f"RESULT critical_target_vs_chunk {crit.target_vs_chunk:.2f}")
        print(f"RESULT critical_exactly_once {int(crit.once)}")


if __name__ == "__main__":
    main()
