"""Shards across simulated nodes (instruments.nodes), real Prefect server and workers, real
vLLM in each flow run's process on CPU: two nodes share one batch and both serve it, and the
one left finishes it when the other dies; a critical batch takes the only GPU of a node from a
running bulk batch at a chunk boundary, and the bulk batch comes back after it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID

import pytest
from sqlalchemy import func, select

from instruments.nodes import INSTALLED, Cluster, Node, vllm_model_info_cache
from instruments.pools import apply_pools, deploy_tiers
from instruments.postgres import create_database
from instruments.prefect_server import prefect_server
from instruments.processes import BIN, wait_for
from instruments.rows import batch_of, result_times
from offline_queue.store.db import session
from offline_queue.store.tables import Batch, GpuSeat, Request, Result
from tests.test_pipeline import line, read, write

pytestmark = pytest.mark.slow

TOPOLOGY = {
    "tiers": {
        "critical": {"priority": 1, "concurrency_limit": 2},
        "standard": {"priority": 2, "concurrency_limit": 2},
        "bulk": {"priority": 3, "concurrency_limit": 2},
    },
    "groups": {
        # Two nodes of one GPU each: a batch gets two shards.
        "pair": {"concurrency_limit": 4, "gpu_slots": 2},
        # One node, one GPU, room for a critical run beside a bulk one (not for its GPU).
        "solo": {"concurrency_limit": 3, "gpu_slots": 1},
    },
}


@pytest.fixture(scope="module")
def cluster(
    pg_server: str, model_dir: Path, nodes: Cluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    """A Prefect server on PostgreSQL, the test topology applied, and one deployment of the
    batch flow per group and tier (in-process vLLM, the bundled model)."""
    store = create_database(pg_server, f"oq_shards_{uuid.uuid4().hex[:8]}")
    with prefect_server(
        tmp_path_factory.mktemp("prefect-home"),
        database_url=create_database(pg_server, f"prefect_shards_{uuid.uuid4().hex[:8]}"),
    ) as env:
        logs = tmp_path_factory.mktemp("node-logs")
        env.update(PREFECT_WORKER_QUERY_SECONDS="1", OQ_TEST_STORE=store, OQ_TEST_LOGS=str(logs))
        apply_pools(TOPOLOGY, nodes.dir, store, env)
        with api(env):
            deploy_tiers(TOPOLOGY, db=store)
        yield env


@contextlib.contextmanager
def api(env: dict[str, str]) -> Iterator[None]:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        yield


@contextlib.contextmanager
def node_workers(
    nodes: Cluster, env: dict[str, str], model_dir: Path, group: str, names: list[str]
) -> Iterator[list[Node]]:
    """A node per name (the model folder installed), each with `offline-queue worker start
    --group GROUP --gpus 1`; their logs (the flow runs' too) are shown if the test fails."""
    started = []
    logs = []
    for name in names:
        node = nodes.node(name, installed=(*INSTALLED, model_dir, *vllm_model_info_cache()))
        log = Path(env["OQ_TEST_LOGS"]) / f"{name}-worker.log"
        logs.append(log)
        with log.open("wb") as out:
            node.popen(
                [str(BIN / "offline-queue"), "worker", "start", "--group", group, "--gpus", "1"],
                env=node.env(env),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        started.append(node)
    try:
        yield started
    except BaseException:
        for log in logs:
            print(f"--- {log.name}\n{log.read_text(errors='replace')[-6000:]}")
        raise
    finally:
        for node in started:
            node.stop()
            nodes.nodes.remove(node)


def start_run(env: dict[str, str], deployment: str, path: Path, **params: object) -> UUID:
    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments import run_deployment

    with api(env):
        started: FlowRun = run_deployment(  # type: ignore[assignment]  # sync: not a coroutine
            f"batch-inference/{deployment}",
            parameters={"input": str(path), "chunk_size": 8, **params},
            timeout=0,
        )
    return started.id


def exactly_once(batch: Batch, n: int, prefix: str) -> None:
    ids = Counter(o["custom_id"] for o in read(batch.output_path) + read(batch.error_path))
    assert set(ids.values()) == {1}, ids.most_common(3)
    assert sorted(ids) == sorted(f"{prefix}{i}" for i in range(n))


class Owners:
    """The lines each host held a lease on, sampled while the batch runs: a line a host held
    whose result is written was answered by that host (only its lease holder commits it; the
    leases here last longer than the test looks)."""

    def __init__(self, store: str):
        self.store, self.lines = store, dict[str, set[int]]()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def served(self, host: str) -> int:
        held = self.lines.get(host, set())
        with session(self.store) as s:
            done = set(s.scalars(select(Result.line_no).where(Result.line_no.in_(held))))
        return len(done)

    def __enter__(self) -> Owners:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            with contextlib.suppress(Exception), session(self.store) as s:
                leases = s.execute(
                    select(Request.lease_owner, Request.line_no).where(
                        Request.lease_owner.is_not(None)
                    )
                ).all()
                for owner, line_no in leases:
                    self.lines.setdefault(owner.split(":", 1)[0], set()).add(line_no)


def test_two_nodes_share_a_batch_and_one_finishes_it_when_the_other_dies(
    cluster: dict[str, str], nodes: Cluster, model_dir: Path
) -> None:
    store = cluster["OQ_TEST_STORE"]
    n = 96  # 12 chunks: the two engines start within seconds of each other, and serve 2-3 s a chunk
    path = write(nodes.dir / "shared.jsonl", [line(f"s{i}", max_tokens=8) for i in range(n)])
    with (
        node_workers(nodes, cluster, model_dir, "pair", ["pair-a", "pair-b"]) as (a, b),
        Owners(store) as owners,
    ):
        parent = start_run(cluster, "pair-bulk", path, lease_seconds=10)
        wait_for(
            lambda: owners.served("pair-a") and owners.served("pair-b"), timeout=180, interval=0.5
        )
        batch = batch_of(store, path)
        assert batch is not None
        served_before = len(result_times(store, batch.id))
        assert served_before < n, "the batch ended before both nodes served it"
        # Kill the node that does not run the batch's first run, as a machine dies: the first
        # run takes the dead shard's chunk after its lease, and finalizes.
        with api(cluster):
            from prefect.client.orchestration import get_client

            with get_client(sync_client=True) as client:
                parent_pid = client.read_flow_run(parent).infrastructure_pid
        assert parent_pid
        victim = next(x for x in (a, b) if int(parent_pid) not in x.pids())
        for pid in victim.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        killed_at = time.time()

        def final() -> Batch | None:
            found = batch_of(store, path)
            return found if found and found.status == "completed" else None

        done = wait_for(final, timeout=300, interval=1)
        assert done is not None
    print(
        f"lines answered by node: { {h: owners.served(h) for h in owners.lines} }; "
        f"{served_before} chunks of {n} lines committed when {victim.name} was killed; "
        f"finished {done.completed_at - killed_at:.0f} s after"  # type: ignore[operator]
    )
    exactly_once(done, n, "s")


def test_a_critical_batch_takes_the_only_gpu_of_a_node_at_a_chunk_boundary(
    cluster: dict[str, str], nodes: Cluster, model_dir: Path
) -> None:
    store = cluster["OQ_TEST_STORE"]
    # 12 bulk chunks: 2 before the critical run starts, a few while it starts (5 when its run
    # took 12 s), the one in flight at its arrival, and some left for after it.
    n_bulk, n_crit = 96, 8
    bulk = write(nodes.dir / "bulk.jsonl", [line(f"b{i}", max_tokens=8) for i in range(n_bulk)])
    critical = write(
        nodes.dir / "critical.jsonl", [line(f"c{i}", max_tokens=8) for i in range(n_crit)]
    )
    with node_workers(nodes, cluster, model_dir, "solo", ["solo"]):
        start_run(cluster, "solo-bulk", bulk)

        def bulk_chunks() -> int:
            found = batch_of(store, bulk)
            return len(result_times(store, found.id)) if found else 0

        wait_for(lambda: bulk_chunks() >= 2, timeout=240, interval=0.2)
        start_run(cluster, "solo-critical", critical)
        crit = wait_for(lambda: batch_of(store, critical), timeout=120, interval=0.05)
        assert crit is not None

        # Arrival: when the critical batch's shard waits for the node's GPU (its run started,
        # its batch registered). From then on the bulk shard may finish the chunk it is in
        # (and what the chunk it claimed ahead had started in that chunk's tail), and must
        # hand the GPU over at that chunk's end.
        def critical_waits() -> bool:
            with session(store) as s:
                return (
                    s.scalar(select(GpuSeat.shard).where(GpuSeat.batch_id == crit.id)) is not None
                )

        wait_for(critical_waits, timeout=240, interval=0.05)
        arrived = time.time()

        def both_final() -> tuple[Batch, Batch] | None:
            b, c = batch_of(store, bulk), batch_of(store, critical)
            if b and c and b.status == "completed" and c.status == "completed":
                return b, c
            return None

        finals = wait_for(both_final, timeout=600, interval=1)
        assert finals is not None
        bulk_done, crit_done = finals
    bulk_commits = [t for t in result_times(store, bulk_done.id) if t > arrived]
    crit_first = result_times(store, crit.id)[0]
    assert len(bulk_commits) >= 2, "the bulk batch ended before it could be pre-empted"
    with session(store) as s:
        bulk_meanwhile = s.scalar(
            select(func.count())
            .select_from(Result)
            .where(
                Result.batch_id == bulk_done.id,
                Result.created_at > arrived,
                Result.created_at < crit_first,
            )
        )
    print(
        f"critical first result {crit_first - arrived:.1f} s after it arrived; bulk chunks "
        f"committed after it at +{bulk_commits[0] - arrived:.1f} s, "
        f"+{bulk_commits[1] - arrived:.1f} s; {bulk_meanwhile} bulk answers before it"
    )
    # At most the chunk in flight at arrival and the one claimed at its tail (8 lines each);
    # without the hand-over the bulk shard goes on serving chunk after chunk meanwhile.
    assert bulk_meanwhile is not None and bulk_meanwhile <= 2 * 8
    # The bulk batch came back after the critical one and finished, every line once.
    assert bulk_commits[-1] > result_times(store, crit.id)[-1]
    exactly_once(bulk_done, n_bulk, "b")
    exactly_once(crit_done, n_crit, "c")
