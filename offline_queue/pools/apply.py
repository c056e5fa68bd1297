"""`offline-queue pools apply | show`: make the Prefect server match deployments/pools.yaml.

Idempotent: each object is read first and written only when it differs, and the result lists
what was created, updated or left unchanged — a second run reports no change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from prefect.blocks.core import Block
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import (
    WorkPoolCreate,
    WorkPoolUpdate,
)
from prefect.exceptions import ObjectNotFound
from prefect.workers.process import ProcessWorker
from pydantic import SecretStr

from offline_queue.blocks.catalog import ServedModelBlock
from offline_queue.blocks.engines import VLLM, OpenAIServer
from offline_queue.blocks.storage import ObjectStorage
from offline_queue.blocks.store import Store
from offline_queue.pools.topology import Topology


@dataclass(frozen=True)
class Change:
    kind: str
    name: str
    action: str  # created | updated | unchanged
    detail: str = ""


def _pool(client: SyncPrefectClient, name: str, limit: int, description: str) -> Change:
    try:
        pool = client.read_work_pool(name)
    except ObjectNotFound:
        client.create_work_pool(
            WorkPoolCreate(
                name=name,
                type="process",
                description=description,
                concurrency_limit=limit,
                base_job_template=ProcessWorker.get_default_base_job_template(),
            )
        )
        return Change("work pool", name, "created", f"limit {limit}")
    if pool.concurrency_limit == limit and (pool.description or "") == description:
        return Change("work pool", name, "unchanged", f"limit {limit}")
    client.update_work_pool(name, WorkPoolUpdate(concurrency_limit=limit, description=description))
    return Change("work pool", name, "updated", f"limit {pool.concurrency_limit} → {limit}")


def _queues(client: SyncPrefectClient, topology: Topology, group: str) -> list[Change]:
    existing = {q.name: q for q in client.read_work_queues(work_pool_name=group)}
    changes = []
    for tier, spec in sorted(topology.queues(group).items(), key=lambda kv: kv[1].priority):
        name = f"{group}/{tier}"
        queue = existing.get(tier)
        if queue is None:
            client.create_work_queue(
                name=tier,
                work_pool_name=group,
                priority=spec.priority,
                concurrency_limit=spec.concurrency_limit,
            )
            changes.append(Change("work queue", name, "created", f"priority {spec.priority}"))
        elif (queue.priority, queue.concurrency_limit) != (spec.priority, spec.concurrency_limit):
            client.update_work_queue(
                queue.id, priority=spec.priority, concurrency_limit=spec.concurrency_limit
            )
            changes.append(Change("work queue", name, "updated", f"priority {spec.priority}"))
        else:
            changes.append(Change("work queue", name, "unchanged", f"priority {spec.priority}"))
    return changes


def _comparable(block: Block) -> dict[str, Any]:
    """The block's own fields (not Prefect's document id and name), secrets revealed."""
    values = {name: getattr(block, name) for name in type(block).model_fields}
    return {k: v.get_secret_value() if isinstance(v, SecretStr) else v for k, v in values.items()}


def _block(block: Block, name: str) -> Change:
    slug = block.get_block_type_slug()
    try:
        current = cast(Block, type(block).load(name))
    except ValueError:  # Prefect's "Unable to find block document named …"
        block.save(name)
        return Change("block", f"{slug}/{name}", "created")
    if _comparable(current) == _comparable(block):
        return Change("block", f"{slug}/{name}", "unchanged")
    block.save(name, overwrite=True)
    return Change("block", f"{slug}/{name}", "updated")


def apply(topology: Topology, store_url: str) -> list[Change]:
    """Make the server match `topology`; register our block types; save the store block."""
    for block_type in (VLLM, OpenAIServer, ServedModelBlock, Store, ObjectStorage):
        block_type.register_type_and_schema()
    changes: list[Change] = []
    with get_client(sync_client=True) as client:
        for name, group in topology.groups.items():
            changes.append(_pool(client, name, group.concurrency_limit, group.description))
            changes += _queues(client, topology, name)
    for group in topology.groups.values():
        if group.engine is not None:
            changes.append(_block(group.engine.build(), group.engine.block.split("/", 1)[1]))
    changes.append(_block(Store(url=SecretStr(store_url)), "default"))
    return changes


@dataclass(frozen=True)
class QueueRow:
    pool: str
    pool_limit: int | None
    queue: str
    priority: int
    queue_limit: int | None
    workers: int


def show(topology: Topology) -> list[QueueRow]:
    """The live state of the pools the file names, one row per queue."""
    rows = []
    with get_client(sync_client=True) as client:
        for name in topology.groups:
            try:
                pool = client.read_work_pool(name)
            except ObjectNotFound:
                rows.append(QueueRow(name, None, "(not applied)", 0, None, 0))
                continue
            workers = len(client.read_workers_for_work_pool(name))
            for q in sorted(client.read_work_queues(work_pool_name=name), key=lambda q: q.priority):
                rows.append(
                    QueueRow(
                        name,
                        pool.concurrency_limit,
                        q.name,
                        q.priority,
                        q.concurrency_limit,
                        workers,
                    )
                )
    return rows
