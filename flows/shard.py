"""Shards: the flow runs that work one batch together, each serving on one GPU of its node.

How a batch gets its shards: its first run (the one that registers and queues it) starts the
others with `run_deployment(..., timeout=0)` — runs of its own deployment, so they land on the
same work pool (the node group) and the same tier queue, with the same parameters plus the
batch's id and a shard number. A shard serves only: it claims chunks of the batch until none is
left, and the first run alone finalizes (it waits for the others' leases as for any worker's).
A dead shard costs one lease; its chunks are claimed again by the others. Outside a worker
(`offline-queue run`, a flow called in process) there is no deployment to start and no GPU
limit: the run is the batch's only shard and serves at once.

Why the GPU a shard holds is its node's limit (`gpu:GROUP:NODE`, made by the node's worker with
as many slots as it has GPUs) and not only the group's `gpu:GROUP`: a GPU is a device on one
machine. With only a group-wide count, a slot freed on node B could be taken by a shard waiting
on node A — whose GPU is busy — and B's GPU would idle while A's is oversubscribed (an
in-process engine would not even fit in memory). A node's limit is freed and taken at the same
GPU, and the hand-over to a waiting higher tier happens between shards of the same node
(offline_queue/slots.py), so every GPU keeps serving. The shard takes a slot of `gpu:GROUP` in
the same atomic acquisition, so the group's limit shows how many of the group's GPUs serve and
caps them at the cluster file's `gpu_slots`; it is also a batch's default number of shards.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from enum import Enum
from uuid import UUID

import httpx
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.concurrency.sync import concurrency
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.runtime import deployment as this_deployment
from prefect.runtime import flow_run

from deployments.apply import gpu_limit_name, node_gpu_limit_name, node_queue_name
from offline_queue.runs import BatchRun
from offline_queue.slots import Seat

log = logging.getLogger(__name__)

GPU_GROUP_ENV = "OFFLINE_QUEUE_GPU_GROUP"
GPU_NODE_ENV = "OFFLINE_QUEUE_GPU_NODE"
"""Set by `offline-queue worker start` for the flow runs it starts: the node's group and name,
which name its GPU limit."""
SLOT_LEASE_SECONDS = 60.0
"""How long a dead shard's GPU stays taken (Prefect's shortest lease; renewed while it lives)."""


def _limit_size(name: str) -> int | None:
    with get_client(sync_client=True) as client:
        try:
            return client.read_global_concurrency_limit_by_name(name).limit
        except ObjectNotFound:
            return None


def default_parallelism() -> int:
    """Every GPU of the group this run's worker serves (`gpu:GROUP`); 1 outside a worker."""
    group = os.environ.get(GPU_GROUP_ENV)
    return (_limit_size(gpu_limit_name(group)) or 1) if group else 1


class Turn(Enum):
    """How a wait for a GPU ended."""

    HELD = "held"
    NOT_NEEDED = "not needed"
    """The batch has nothing left for another shard."""
    ELSEWHERE = "elsewhere"
    """Nothing here will come to us, and another node of the group has a free GPU."""


def free_gpus(group: str) -> dict[str, int]:
    """Each node of the group → its GPU slots free now (its `gpu:GROUP:NODE` limit says)."""
    prefix = f"gpu:{group}:"
    with get_client(sync_client=True) as client:
        limits = client.read_global_concurrency_limits(limit=200)
    return {
        lim.name.removeprefix(prefix): max(lim.limit - lim.active_slots, 0)
        for lim in limits
        if lim.name.startswith(prefix) and lim.active
    }


def place(free: dict[str, int], shards: int, here: str | None = None) -> list[str | None]:
    """The node each of `shards` new shards is sent to: the node with the most free GPUs
    first, one GPU each, `here` counting one less (the run placing them takes one there);
    None for a shard no free GPU is left for (it goes to the tier queue, any node's).

    Why not leave it to Prefect: a run of the pool goes to whichever worker polls first, so a
    batch's second shard is as likely to land where its first holds the only GPU as on an idle
    node — at 16 nodes, 8 engines never served (BENCHMARKS.md, bench/cluster.py)."""
    left = dict(free)
    if here is not None and left.get(here, 0) > 0:
        left[here] -= 1
    targets: list[str | None] = []
    for _ in range(shards):
        open_nodes = [n for n, k in left.items() if k > 0]
        node = max(open_nodes, key=lambda n: (left[n], n)) if open_nodes else None
        if node is not None:
            left[node] -= 1
        targets.append(node)
    return targets


def free_gpu_elsewhere(group: str, node: str) -> str | None:
    """A node of the group other than `node` with a GPU slot free (its limit says), or None."""
    free = {n: k for n, k in free_gpus(group).items() if n != node and k > 0}
    return max(free, key=lambda n: (free[n], n)) if free else None


def start_shard(
    run: BatchRun, batch_id: str, shard: int, key: str, node: str | None = None
) -> UUID | None:
    """One more shard of the batch as a run of this run's deployment (None outside one): in
    `node`'s own work queue when given (only that node's worker polls it), else in the
    deployment's tier queue."""
    deployment = this_deployment.get_id()
    if deployment is None:
        return None
    started = run_deployment(
        UUID(str(deployment)),
        parameters={**run.parameters(), "batch_id": batch_id, "parallelism": 1, "shard": shard},
        timeout=0,
        idempotency_key=key,
        tags=[f"batch:{batch_id}", f"shard:{shard}"],
        work_queue_name=node_queue_name(node) if node else None,
    )
    return started.id  # type: ignore[union-attr]  # sync: not a coroutine


def launch_shards(run: BatchRun, batch_id: str, parallelism: int) -> list[UUID]:
    """Start the batch's other `parallelism - 1` shards as runs of this run's deployment (none
    when this run is not a deployment's), each sent to a node with a free GPU (`place`);
    returns their flow run ids. Idempotent per parent run, so a retried parent starts no
    second set."""
    parent = flow_run.get_id()
    if parent is None or parallelism <= 1:
        return []
    group, here = os.environ.get(GPU_GROUP_ENV), os.environ.get(GPU_NODE_ENV)
    targets = place(free_gpus(group), parallelism - 1, here) if group else []
    targets += [None] * (parallelism - 1 - len(targets))
    started = [
        start_shard(run, batch_id, n, f"{parent}-shard-{n}", node)
        for n, node in enumerate(targets, start=1)
    ]
    return [s for s in started if s is not None]


class GpuSlot:
    """A shard's GPU: its seat at the node's GPUs (tier, waiting or holding) and, while it
    holds, one slot of the node's and the group's Prefect limits."""

    def __init__(
        self,
        seat: Seat,
        names: list[str],
        group: str,
        node: str,
        poll_seconds: float = 0.5,
        look_around_seconds: float = 5.0,
    ):
        self.seat, self.names, self.group, self.node = seat, names, group, node
        self.poll_seconds, self.look_around_seconds = poll_seconds, look_around_seconds
        self._held: contextlib.ExitStack | None = None
        self.moving_to: str | None = None
        """The node with a free GPU a stuck shard moves to (Turn.ELSEWHERE)."""

    @classmethod
    def on_this_node(cls, db: str, shard: str, batch_id: str, tier: int) -> GpuSlot | None:
        """The slot of a run on a node whose worker made its GPU limit; None elsewhere."""
        group, node = os.environ.get(GPU_GROUP_ENV), os.environ.get(GPU_NODE_ENV)
        if not group or not node:
            return None
        name = node_gpu_limit_name(group, node)
        gpus = _limit_size(name)
        if gpus is None:
            log.warning("no GPU limit %s: serving without a GPU slot", name)
            return None
        names = [name] + ([gpu_limit_name(group)] if _limit_size(gpu_limit_name(group)) else [])
        seat = Seat(db, name, gpus, shard, batch_id, tier).start()
        return cls(seat, names, group, node)

    @property
    def holding(self) -> bool:
        return self._held is not None

    def acquire(self, wanted: Callable[[], bool], may_move: bool = True) -> Turn:
        """Wait for our turn at the node's GPUs and take a slot; NOT_NEEDED when `wanted()`
        says the batch no longer needs us before that; ELSEWHERE (if `may_move`) when we are
        stuck here while another node has a free GPU — Prefect gave this run to a worker whose
        GPUs its own batch holds, and no worker is chosen by its free GPUs."""
        look_around = time.monotonic() + self.look_around_seconds
        while wanted():
            if self.seat.may_take() and self._take():
                self.seat.set_holding(True)
                return Turn.HELD
            if may_move and time.monotonic() > look_around:
                look_around = time.monotonic() + self.look_around_seconds
                if self.seat.stuck():
                    self.moving_to = free_gpu_elsewhere(self.group, self.node)
                    if self.moving_to is not None:
                        return Turn.ELSEWHERE
            time.sleep(self.poll_seconds)
        return Turn.NOT_NEEDED

    def _take(self) -> bool:
        """One try at the slots, no waiting in Prefect's client (the seats order the waiters;
        its retry delay could be 30 s)."""
        held = contextlib.ExitStack()
        run_id = flow_run.get_id()
        holder = ConcurrencyLeaseHolder(type="flow_run", id=UUID(run_id)) if run_id else None
        try:
            held.enter_context(
                concurrency(
                    self.names,
                    occupy=1,
                    max_retries=0,
                    lease_duration=SLOT_LEASE_SECONDS,
                    strict=True,
                    holder=holder,
                    raise_on_lease_renewal_failure=False,
                )
            )
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code == httpx.codes.LOCKED:  # a dead holder's lease, say
                return False
            raise
        self._held = held
        return True

    def must_yield(self) -> bool:
        """At a chunk boundary: whether a waiting higher tier needs our GPU."""
        return self.seat.must_yield()

    def release(self) -> None:
        """Give the slot back, then say so in the seats: a waiter that sees a free seat finds
        the slot free (the other order would send it to Prefect's 423 and its delay)."""
        if self._held is not None:
            self._held.close()
            self._held = None
            self.seat.set_holding(False)

    def close(self) -> None:
        try:
            self.release()
        finally:
            self.seat.stop()
