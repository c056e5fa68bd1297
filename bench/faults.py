"""Fault schedules: nothing is lost or done twice when things are SIGKILLed mid-batch.

    .venv/bin/python bench/faults.py [--seed 7] [--trials-per-kind 20]
                                     [--kinds run,loop,node,engine,postgres,proxy]
                                     [--requests 48] [--out DIR]

The driver starts its own services on loopback — a PostgreSQL cluster (the store), a
`prefect server start` (every `offline-queue run` reports to it instead of starting a
temporary server of its own), a `vllm serve` with the bundled model, and a fault-injecting
proxy in front of it — then runs small batches with real `offline-queue run` subprocesses
(each a flow run serving its batch with a loop of its own), beside which some trials start
`offline-queue worker loop` processes on the same route (a node's loops), and, at a moment
drawn from a seeded schedule, injects one fault per trial:

- `run`:      SIGKILL an `offline-queue run` process (its flow and its loop), then re-run it
              until it exits 0;
- `loop`:     SIGKILL a serving loop while it holds a chunk of the batch; the others claim the
              chunk again once its lease runs out;
- `node`:     the run and a loop on a simulated node (instruments.nodes), and the node lost:
              every process in it SIGKILLed at once; the batch is re-run on the host;
- `engine`:   SIGKILL the vLLM server's process group and restart it (the run waits through
              the outage, or is re-run if it gave up);
- `postgres`: SIGKILL the postmaster and its backends, restart with `pg_ctl` (a run that died
              of it is re-run until it exits 0; the loops ride it out);
- `proxy`:    the batch goes through the proxy, whose seeded plan mixes 500, 429, stalls and
              mid-body resets with passed-through requests.

Some trials put two runs on the same batch. After each trial the invariants are checked
straight from the store (SQL, not the product's code) and the files: every custom_id of the
input exactly once across output + error file, no line with two result rows, the batch in a
terminal status, the store's counts equal to the files' lines; and every loop the driver did
not kill drained cleanly at the end (a loop outlives engine and store outages). The end is a
table and `RESULT trials|lost|duplicated <n>`; the exit status is 1 when anything was lost or
duplicated or a trial never finished. `run_schedule()` is the same thing for a test
(tests/test_faults.py). The `node` kind needs what simulated nodes need (root, namespaces);
without them it is left out of the schedule, and says so.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from instruments.faultproxy import FaultProxy  # noqa: E402
from instruments.loopback import free_port  # noqa: E402
from instruments.nodes import Node, namespaces_refused, shared_dir  # noqa: E402
from instruments.postgres import Postgres, postgres  # noqa: E402
from instruments.prefect_server import prefect_server  # noqa: E402
from instruments.processes import BIN, wait_for  # noqa: E402
from offline_queue.engines.vllm_server import ServerProcess, server_args  # noqa: E402
from offline_queue.states import TERMINAL_STATUSES  # noqa: E402

KINDS = ("run", "loop", "node", "engine", "postgres", "proxy")
LEASE_SECONDS = 5  # a killed run's or loop's chunk is claimed again after this long
# One `offline-queue run` invocation, counted from its start or from the end of the last
# service restart, whichever is later (a vLLM restart alone took 6.7 min on a loaded machine);
# longer is a hang, not slowness.
RUN_TIMEOUT = 420.0
MAX_INVOCATIONS = 6  # per trial: the first run and the re-runs after faults
DRAIN_SECONDS = 60.0  # a loop asked to drain once the batch is over holds nothing: it exits


# -- services ----------------------------------------------------------------------------------


@dataclass
class Services:
    """Everything a trial needs, started once per schedule."""

    work: Path
    pg: Postgres
    store: str
    """The store's SQLAlchemy URL (the `faults` database)."""
    prefect_api: str
    server: ServerProcess
    server_args: list[str]
    server_log: IO[bytes]
    proxy: FaultProxy
    env: dict[str, str]
    shared: Path
    """Where a `node` trial's batch files are: a directory the nodes see (the work folder may
    be under /tmp, which is each node's own)."""

    @property
    def store_plain(self) -> str:
        """The store's URL for psycopg (the invariants are checked by SQL, not the product)."""
        return self.store.replace("postgresql+psycopg://", "postgresql://")

    @property
    def server_url(self) -> str:
        return f"{self.server.base_url}/v1"

    def restart_server(self) -> None:
        # Assigned before waiting: an interrupted wait must still find (and stop) the new one.
        self.server = ServerProcess(
            self.server_args, "127.0.0.1", self._server_port, log=self.server_log
        ).start()
        self.server.wait_ready(timeout=600)

    @property
    def _server_port(self) -> int:
        return int(self.server.base_url.rsplit(":", 1)[1])


@contextlib.contextmanager
def services(work: Path, log: Callable[[str], None] = print) -> Iterator[Services]:
    """PostgreSQL, a Prefect server, `vllm serve` and the proxy, all on loopback, all ours. The
    Prefect server is in a session of its own: the faults kill process groups, never its."""
    from offline_queue.model import prepare_bundled_model

    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    port = free_port()
    args = server_args(prepare_bundled_model(), "127.0.0.1", port, "smollm2")
    with contextlib.ExitStack() as stack:
        pg = stack.enter_context(postgres())
        store = pg.create_database("faults")
        server_log = stack.enter_context((work / "vllm-serve.log").open("ab"))
        server = ServerProcess(args, "127.0.0.1", port, log=server_log).start()  # beside Prefect's
        svc: Services | None = None
        stack.callback(lambda: (svc.server if svc else server).stop())  # a restart replaced it
        env = stack.enter_context(
            prefect_server(
                work / "prefect-home",
                timeout=300,
                PREFECT_LOGGING_LEVEL="WARNING",
            )
        )
        env.pop("OFFLINE_QUEUE_DB", None)
        env["VLLM_LOGGING_LEVEL"] = "WARNING"
        server.wait_ready(timeout=600)
        proxy = stack.enter_context(FaultProxy(server.base_url, lambda _: "pass", stall_seconds=2))
        api = env["PREFECT_API_URL"]
        shared = shared_dir("oq-faults-")
        stack.callback(shutil.rmtree, shared, ignore_errors=True)
        svc = Services(work, pg, store, api, server, args, server_log, proxy, env, shared)
        log(
            f"services up in {time.monotonic() - started:.0f} s: store {store}, "
            f"prefect {api}, vllm {server.base_url}, proxy {proxy.url}"
        )
        yield svc


# -- one trial -----------------------------------------------------------------------------------


@dataclass
class Trial:
    kind: str
    index: int
    requests: int
    chunk: int
    runs: int
    """`offline-queue run` processes started on the batch at once."""
    loops: int
    """`offline-queue worker loop` processes on the batch's route beside them."""
    trigger: int
    """Committed results at which the fault is injected (proxy: not used)."""
    injected: int = 0
    """Faults actually delivered: a signal to a live process, or a non-pass proxy answer."""
    fault_at: int = -1
    """Results committed just before the kill (-1: no kill, or the store could not say)."""
    held: int = 0
    """Requests leased to the killed run, loop or node as it died (-1: the store could not
    say): a kill mid-chunk, whose chunk is claimed again once the lease runs out."""
    invocations: int = 0
    exit_codes: list[int] = field(default_factory=list)
    """Of every `offline-queue run` invocation (-9: SIGKILLed by the driver)."""
    lost: int = 0
    duplicated: int = 0
    failed_requests: int = 0
    status: str = ""
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)


def batch_lines(rng: random.Random, tag: str, n: int) -> tuple[list[dict[str, Any]], list[str]]:
    """`n` small requests — chat and completions, greedy and sampled — and sometimes one
    invalid line, which must land in the error file exactly once like any other."""
    items: list[dict[str, Any]] = []
    for j in range(n):
        cid = f"{tag}-{j}"
        body: dict[str, Any] = {"model": "smollm2", "max_tokens": rng.randint(4, 8)}
        if rng.random() < 0.5:
            body["temperature"] = 0
        else:
            body["temperature"] = 0.8
            if rng.random() < 0.5:
                body["seed"] = rng.randint(0, 10**6)
        if rng.random() < 0.7:
            url = "/v1/chat/completions"
            body["messages"] = [{"role": "user", "content": f"Say something about {cid}."}]
        else:
            url = "/v1/completions"
            body["prompt"] = f"Once upon a time, {cid}"
        items.append({"custom_id": cid, "method": "POST", "url": url, "body": body})
    if rng.random() < 0.5:
        bad = {"model": "smollm2", "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]}
        items.insert(
            rng.randint(0, n),
            {
                "custom_id": f"{tag}-bad",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": bad,
            },
        )
    return items, [x["custom_id"] for x in items]


def proxy_plan(rng: random.Random, p_fault: float) -> Callable[[int], str]:
    """A fixed, seeded sequence of answers: the n-th completion request gets plan[n]."""
    plan = [
        rng.choice(("500", "429", "stall", "reset")) if rng.random() < p_fault else "pass"
        for _ in range(20000)
    ]
    return lambda n: plan[n % len(plan)]


def _popen(svc: Services, cmd: list[str], log: Path, node: Node | None) -> subprocess.Popen[bytes]:
    """`cmd` here, or in `node` (pointed at its private places), its output in `log`.out/.err."""
    with log.with_suffix(".out").open("wb") as out, log.with_suffix(".err").open("wb") as err:
        if node is not None:
            return node.popen(cmd, env=node.env(svc.env), stdout=out, stderr=err)
        return subprocess.Popen(cmd, env=svc.env, cwd=REPO, stdout=out, stderr=err)


class Runs:
    """The `offline-queue run` processes of one trial, each invocation logged to its own file."""

    def __init__(self, svc: Services, trial: Trial, path: Path, engine: str, logs: Path):
        self.svc, self.trial, self.path, self.engine, self.logs = svc, trial, path, engine, logs
        self.procs: list[subprocess.Popen[bytes]] = []
        self.last_json: dict[str, Any] | None = None
        self.restored = 0.0
        """When the faulted service was back (monotonic clock; 0: no restart)."""

    def start(self, node: Node | None = None) -> subprocess.Popen[bytes]:
        self.trial.invocations += 1
        n = self.trial.invocations
        cmd = [
            str(BIN / "offline-queue"),
            "run",
            str(self.path),
            "--db",
            self.svc.store,
            "--engine",
            self.engine,
            "--chunk-size",
            str(self.trial.chunk),
            "--lease-seconds",
            str(LEASE_SECONDS),
            "--json",
        ]
        if self.trial.kind == "loop":  # only the trial's loops serve: one of them is the victim
            cmd.append("--no-serve")
        proc = _popen(self.svc, cmd, self.logs / f"run{n}", node)
        proc.started = time.monotonic()  # type: ignore[attr-defined]
        proc.number = n  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def live(self) -> list[subprocess.Popen[bytes]]:
        return [p for p in self.procs if p.poll() is None]

    def finish(self) -> bool:
        """Wait for every process; re-run (here) after each failure until one run exits 0 after
        all the others ended (or the invocation budget is spent). True when the batch got
        there."""
        while True:
            for p in list(self.procs):
                since = max(p.started, self.restored)  # type: ignore[attr-defined]
                left = RUN_TIMEOUT - (time.monotonic() - since)
                try:
                    p.wait(max(1.0, left))
                except subprocess.TimeoutExpired:
                    self.trial.problems.append(f"run {p.number} hung > {RUN_TIMEOUT:.0f} s")  # type: ignore[attr-defined]
                    p.kill()
                    p.wait()
            codes = [p.returncode for p in self.procs]
            self.trial.exit_codes += codes
            done = [p for p in self.procs if p.returncode == 0]
            if done:
                out = (self.logs / f"run{done[-1].number}.out").read_text()  # type: ignore[attr-defined]
                with contextlib.suppress(ValueError, IndexError):
                    self.last_json = json.loads(out.strip().splitlines()[-1])
                return True
            if self.trial.invocations >= MAX_INVOCATIONS:
                self.trial.problems.append(f"no run exited 0 in {len(codes)} runs: {codes}")
                return False
            self.procs = []
            self.start()


class Loops:
    """The trial's `offline-queue worker loop` processes on the batch's route: started before
    its runs, drained (SIGTERM) once the batch is over. One the driver did not kill must still
    be there then and drain cleanly: a loop rides out engine and store outages."""

    def __init__(self, svc: Services, trial: Trial, engine: str, logs: Path):
        self.svc, self.trial, self.engine, self.logs = svc, trial, engine, logs
        self.procs: list[subprocess.Popen[bytes]] = []
        self.killed: list[subprocess.Popen[bytes]] = []

    def start(self, node: Node | None = None) -> subprocess.Popen[bytes]:
        cmd = [
            str(BIN / "offline-queue"),
            "worker",
            "loop",
            "--engine",
            self.engine,
            "--db",
            self.svc.store,
            "--chunk-size",
            str(self.trial.chunk),
            "--lease-seconds",
            str(LEASE_SECONDS),
        ]
        proc = _popen(self.svc, cmd, self.logs / f"loop{len(self.procs) + 1}", node)
        self.procs.append(proc)
        return proc

    def live(self) -> list[subprocess.Popen[bytes]]:
        return [p for p in self.procs if p.poll() is None]

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        proc.send_signal(signal.SIGKILL)
        self.killed.append(proc)

    def stop(self) -> None:
        for i, p in enumerate(self.procs, 1):
            if p.poll() is not None and p not in self.killed:
                self.trial.problems.append(f"loop {i} exited {p.returncode} mid-batch")
        draining = self.live()
        for p in draining:
            p.terminate()
        for p in draining:
            i = self.procs.index(p) + 1
            try:
                p.wait(DRAIN_SECONDS)
            except subprocess.TimeoutExpired:
                self.trial.problems.append(f"loop {i} still there {DRAIN_SECONDS:.0f} s after")
                p.kill()
                p.wait()
                continue
            if p.returncode != 0:
                self.trial.problems.append(f"loop {i} exited {p.returncode} when drained")


def _query(plain_url: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(plain_url, connect_timeout=3, autocommit=True) as conn:
        return list(conn.execute(sql, params).fetchall())


def committed(svc: Services, path: Path) -> int:
    """Result rows of the batch read from `path` (-1 while the store cannot say)."""
    try:
        rows = _query(
            svc.store_plain,
            "SELECT count(*) FROM results r JOIN batches b ON b.id = r.batch_id "
            "WHERE b.input_path = %s",
            str(path.resolve()),
        )
        return int(rows[0][0])
    except Exception:
        return -1


def held(svc: Services, owners: str) -> int:
    """Requests leased right now to the loops whose id is LIKE `owners` (a loop's id is
    host:pid:suffix); -1 while the store cannot say."""
    try:
        rows = _query(
            svc.store_plain,
            "SELECT count(*) FROM requests WHERE state = 'processing' AND lease_owner LIKE %s",
            owners,
        )
        return int(rows[0][0])
    except Exception:
        return -1


def of_process(proc: subprocess.Popen[bytes]) -> str:
    """The loops of a process here (this host's pids are unique), as `held` matches them."""
    return f"%:{proc.pid}:%"


def check(
    svc: Services,
    trial: Trial,
    path: Path,
    expected: list[str],
    last_json: dict[str, Any] | None = None,
) -> None:
    """The invariants, read from the store by SQL and from the two files."""
    rows = _query(
        svc.store_plain, "SELECT id, status FROM batches WHERE input_path = %s", str(path.resolve())
    )
    if len(rows) != 1:
        trial.problems.append(f"{len(rows)} batch rows for the file")
        trial.lost = len(expected)
        return
    batch_id, trial.status = rows[0]
    if trial.status not in TERMINAL_STATUSES:
        trial.problems.append(f"batch status {trial.status}")
    twice = _query(
        svc.store_plain,
        "SELECT line_no, count(*) FROM results WHERE batch_id = %s GROUP BY line_no "
        "HAVING count(*) > 1",
        batch_id,
    )
    ok, failed = _query(
        svc.store_plain,
        "SELECT coalesce(sum(CASE WHEN ok THEN 1 ELSE 0 END), 0), "
        "coalesce(sum(CASE WHEN ok THEN 0 ELSE 1 END), 0) FROM results WHERE batch_id = %s",
        batch_id,
    )[0]
    open_requests = _query(
        svc.store_plain,
        "SELECT count(*) FROM requests WHERE batch_id = %s AND state IN ('queued', 'processing')",
        batch_id,
    )[0][0]
    out_path = path.with_name(path.name.removesuffix(".jsonl") + ".output.jsonl")
    err_path = path.with_name(path.name.removesuffix(".jsonl") + ".errors.jsonl")
    files: dict[str, list[str]] = {}
    for name, p in (("output", out_path), ("errors", err_path)):
        lines = p.read_text().splitlines() if p.exists() else []
        files[name] = [json.loads(x).get("custom_id") for x in lines if x.strip()]
    seen = Counter(files["output"] + files["errors"])
    want = set(expected)
    trial.lost = len(want - set(seen))
    trial.duplicated = (
        sum(c - 1 for c in seen.values() if c > 1)
        + sum(c for cid, c in seen.items() if cid not in want)
        + sum(int(c) - 1 for _, c in twice)
    )
    trial.failed_requests = len(files["errors"])
    if twice:
        trial.problems.append(f"lines with two result rows: {[int(x) for x, _ in twice][:5]}")
    if (int(ok), int(failed)) != (len(files["output"]), len(files["errors"])):
        trial.problems.append(
            f"store counts ok={ok} failed={failed} vs files output={len(files['output'])} "
            f"errors={len(files['errors'])}"
        )
    if open_requests:
        trial.problems.append(f"{open_requests} requests still queued/processing")
    counts = last_json and last_json.get("request_counts")
    if counts and counts != {
        "total": len(expected),
        "completed": len(files["output"]),
        "failed": len(files["errors"]),
    }:
        trial.problems.append(f"run --json request_counts {counts} disagree with the files")


def _inject(
    svc: Services,
    trial: Trial,
    runs: Runs,
    loops: Loops,
    rng: random.Random,
    node: Node | None,
) -> None:
    """Start the trial's loops and runs (a `node` trial's in its node), deliver its fault at the
    drawn moment, and see the batch through to a run that exits 0 (re-running after each
    failure)."""
    kind, trigger = trial.kind, trial.trigger
    for _ in range(trial.loops):
        loops.start(node)
    for _ in range(trial.runs):
        runs.start(node)

    if kind != "proxy":
        # The random moment: once `trigger` results are committed, plus a little jitter; a loop
        # is killed once it also holds a chunk of the batch.
        # The loop killed is one that holds a chunk of the batch at that moment.
        victim: subprocess.Popen[bytes] | None = None

        def moment() -> bool:
            nonlocal victim
            if not runs.live():
                return True
            if committed(svc, runs.path) < trigger:
                return False
            if kind != "loop":
                return True
            holding = [p for p in loops.live() if held(svc, of_process(p)) > 0]
            victim = rng.choice(holding) if holding else None
            return victim is not None

        with contextlib.suppress(TimeoutError):
            wait_for(moment, RUN_TIMEOUT, 0.05)
        time.sleep(rng.uniform(0, 6) if trigger == 0 and kind != "loop" else rng.uniform(0, 0.3))
        if runs.live():
            trial.fault_at = committed(svc, runs.path)
        if kind == "run":
            live = runs.live()
            if live:
                chosen = rng.choice(live)
                trial.held = held(svc, of_process(chosen))
                chosen.send_signal(signal.SIGKILL)
                trial.injected += 1
        elif kind == "loop":
            if victim is not None and victim.poll() is None and runs.live():
                trial.held = held(svc, of_process(victim))
                loops.kill(victim)
                trial.injected += 1
        elif kind == "node":
            if node is not None and runs.live():
                trial.held = held(svc, f"{node.name}:%")
                loops.killed += loops.procs  # every loop of the trial is on the node
                node.lose()
                trial.injected += 1
        elif kind == "engine":
            if runs.live() and svc.server.proc and svc.server.proc.poll() is None:
                svc.server.kill()
                trial.injected += 1
                time.sleep(rng.uniform(0, 2))
                svc.restart_server()
                runs.restored = time.monotonic()
        elif kind == "postgres" and runs.live() and svc.pg.kill():
            trial.injected += 1
            time.sleep(rng.uniform(0, 3))
            svc.pg.start()
            runs.restored = time.monotonic()
    runs.finish()
    loops.stop()


def run_trial(svc: Services, kind: str, index: int, seed: int, requests: int) -> Trial:
    rng = random.Random(f"{seed}:{kind}:{index}")
    n = rng.randint(max(8, requests // 2), requests)
    chunk = rng.choice((4, 6, 8))
    n_runs = 2 if kind in ("run", "postgres") and rng.random() < 0.25 else 1
    if kind == "loop":
        n_loops = 2  # the victim, and one that serves on
    elif kind in ("node", "postgres"):
        n_loops = 1  # the node's loop; a loop that must ride out the store's restart
    else:
        n_loops = int(rng.random() < 0.5)
    # One trial in five strikes before any result (start-up, ingest, first chunk), the rest
    # once a drawn number of results is committed: kills land everywhere in a batch's life.
    trigger = 0 if rng.random() < 0.2 else rng.randint(1, max(1, n - 2 * chunk))
    if kind == "loop":
        # A loop's victim must hold a chunk when struck: its loops claim the batch's chunks
        # together and end them within moments of each other, so past the first results
        # nothing may be held any more (the short schedule's loop trial once found no victim).
        trigger = 0
    trial = Trial(kind, index, n, chunk, n_runs, n_loops, trigger)
    tag = f"s{seed}-{kind}-{index}"
    trials = svc.work / "trials"
    logs = trials / f"{tag}.logs"
    logs.mkdir(parents=True, exist_ok=True)
    path = (svc.shared if kind == "node" else trials) / f"{tag}.jsonl"
    items, expected = batch_lines(rng, tag, n)
    path.write_text("".join(json.dumps(x) + "\n" for x in items))
    for stale in (path.with_suffix(".output.jsonl"), path.with_suffix(".errors.jsonl")):
        stale.unlink(missing_ok=True)

    started = time.monotonic()
    engine = svc.server_url
    if kind == "proxy":
        svc.proxy.plan = proxy_plan(rng, p_fault=0.3)
        svc.proxy._counter = itertools.count()
        svc.proxy.seen = Counter()
        engine = svc.proxy.url
    runs = Runs(svc, trial, path, engine, logs)
    loops = Loops(svc, trial, engine, logs)
    node = Node(f"faults-{index}").start() if kind == "node" else None
    try:
        _inject(svc, trial, runs, loops, rng, node)
    except BaseException:  # interrupted: leave no `offline-queue` process behind
        for p in [*runs.live(), *loops.live()]:
            p.kill()
        raise
    finally:
        if node is not None:
            node.stop()
    if kind == "proxy":
        trial.injected = sum(c for f, c in svc.proxy.seen.items() if f != "pass")
        svc.proxy.plan = lambda _: "pass"
    try:
        check(svc, trial, path, expected, runs.last_json)
    except Exception as exc:  # the store itself unreadable is a finding, not a crash
        trial.problems.append(f"check failed: {type(exc).__name__}: {exc}")
    trial.seconds = time.monotonic() - started
    return trial


# -- the schedule ------------------------------------------------------------------------------


@dataclass
class Summary:
    trials: list[Trial]

    @property
    def lost(self) -> int:
        return sum(t.lost for t in self.trials)

    @property
    def duplicated(self) -> int:
        return sum(t.duplicated for t in self.trials)

    @property
    def problems(self) -> list[str]:
        return [f"{t.kind}#{t.index}: {p}" for t in self.trials for p in t.problems]

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.duplicated == 0 and not self.problems

    def table(self) -> str:
        head = (
            f"{'kind':<9} {'trials':>6} {'faults':>6} {'mid':>4} {'held':>4} {'runs':>5} "
            f"{'requests':>8} {'failed':>6} {'lost':>5} {'dup':>5} {'s/trial':>7} {'problems':>8}"
        )
        rows = [head, "-" * len(head)]
        kinds = list(dict.fromkeys(t.kind for t in self.trials))
        for kind in [*kinds, "total"]:
            ts = [t for t in self.trials if kind in (t.kind, "total")]
            if not ts:
                continue
            rows.append(
                f"{kind:<9} {len(ts):>6} {sum(t.injected for t in ts):>6} "
                f"{sum(0 < t.fault_at < t.requests for t in ts):>4} "
                f"{sum(t.held > 0 for t in ts):>4} {sum(t.invocations for t in ts):>5} "
                f"{sum(t.requests for t in ts):>8} "
                f"{sum(t.failed_requests for t in ts):>6} {sum(t.lost for t in ts):>5} "
                f"{sum(t.duplicated for t in ts):>5} "
                f"{sum(t.seconds for t in ts) / len(ts):>7.1f} "
                f"{sum(len(t.problems) for t in ts):>8}"
            )
        return "\n".join(rows)

    def result_lines(self) -> str:
        return (
            f"RESULT trials {len(self.trials)}\nRESULT lost {self.lost}\n"
            f"RESULT duplicated {self.duplicated}"
        )


def run_schedule(
    seed: int = 7,
    trials_per_kind: int = 20,
    kinds: tuple[str, ...] = KINDS,
    requests: int = 48,
    out: Path | None = None,
    log: Callable[[str], None] = print,
) -> Summary:
    """Run the schedule: trials interleaved across kinds (a partial run covers every kind),
    each trial's record appended to `out/trials.jsonl` as soon as it is known."""
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"unknown fault kind {kind!r} (known: {', '.join(KINDS)})")
    refused = namespaces_refused() if "node" in kinds else None
    if refused:
        log(f"the node kind is left out: this machine cannot make nodes ({refused})")
        kinds = tuple(k for k in kinds if k != "node")
    work = out or Path(tempfile.mkdtemp(prefix="oq-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    record = work / "trials.jsonl"
    trials: list[Trial] = []
    with services(work, log) as svc:
        for index in range(trials_per_kind):
            for kind in kinds:
                trial = run_trial(svc, kind, index, seed, requests)
                trials.append(trial)
                with record.open("a") as f:
                    f.write(json.dumps(asdict(trial)) + "\n")
                log(
                    f"{kind:<8} #{index:<3} n={trial.requests:<3} chunk={trial.chunk} "
                    f"runs={trial.runs} loops={trial.loops} trigger={trial.trigger:<3} "
                    f"at={trial.fault_at:<3} held={trial.held:<2} faults={trial.injected:<3} "
                    f"invocations={trial.invocations} "
                    f"status={trial.status:<9} lost={trial.lost} dup={trial.duplicated} "
                    f"{trial.seconds:5.1f} s {'; '.join(trial.problems)}"
                )
    return Summary(trials)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--trials-per-kind", type=int, default=20)
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated")
    parser.add_argument("--requests", type=int, default=48, help="most requests per batch")
    parser.add_argument("--out", type=Path, default=None, help="work dir (default: a temp dir)")
    parser.add_argument(
        "--report",
        type=Path,
        default=None,
        help="only print the table of a (maybe unfinished) run's OUT/trials.jsonl",
    )
    a = parser.parse_args()
    kinds = tuple(k.strip() for k in a.kinds.split(",") if k.strip())
    started = time.monotonic()
    if a.report:
        records = [json.loads(x) for x in a.report.read_text().splitlines() if x.strip()]
        summary = Summary([Trial(**r) for r in records])
    else:
        print(
            f"machine: {platform.machine()} {os.cpu_count()} cores, {platform.platform()}; "
            f"seed {a.seed}, {a.trials_per_kind} trials per kind of {', '.join(kinds)}",
            flush=True,
        )
        summary = run_schedule(
            a.seed, a.trials_per_kind, kinds, a.requests, a.out, lambda s: print(s, flush=True)
        )
    print()
    print(summary.table())
    print(
        "faults: kills delivered to a live process (proxy: injected answers); mid: kills with "
        "some but not all results committed; held: kills of a run, loop or node that held "
        "leased requests (mid-chunk); runs: `offline-queue run` invocations; failed: "
        "error-file lines (the invalid line some batches carry, or requests out of attempts)"
    )
    for problem in summary.problems:
        print("PROBLEM", problem)
    print(f"wall time {time.monotonic() - started:.0f} s")
    print(summary.result_lines(), flush=True)
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
