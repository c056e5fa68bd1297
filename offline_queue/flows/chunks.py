"""The infer-chunk task runs a batch's run shows: each chunk a serving loop served for the
batch, recorded in the batch's own flow run (Prefect's client creates a task run in any flow
run), so the run graph reads submit → validate-and-queue → infer-chunk … → finalize while the
work itself happens in the loops (offline_queue/loop.py)."""

from __future__ import annotations

import logging
from collections import Counter
from uuid import UUID

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import State
from prefect.runtime import flow_run
from prefect.states import Completed, Running

from offline_queue.store import gpu_time

log = logging.getLogger(__name__)


@task(name="infer-chunk", cache_policy=NO_CACHE)
def infer_chunk() -> None:
    """A chunk a serving loop claimed, answered and settled in one transaction (only recorded
    here: see the module)."""


class ChunkRecords:
    """The batch's chunks served since this run began, made task runs of its flow run (none
    outside one), and the requests each loop sent to its engine for them."""

    def __init__(self, db: str, batch_id: str):
        self.db, self.batch_id = db, batch_id
        run_id = flow_run.get_id()
        self.flow_run_id = UUID(run_id) if run_id else None
        self._last = gpu_time.last_chunk(db, batch_id)  # a resumed batch's earlier chunks: not ours
        self._count = 0
        self.sent: Counter[str | None] = Counter()

    def inferred(self, loop: str | None) -> int:
        """Requests `loop` sent to its engine for the batch (None: every loop together)."""
        return self.sent[loop] if loop is not None else sum(self.sent.values())

    def record(self) -> None:
        rows = gpu_time.chunks_after(self.db, self.batch_id, self._last)
        if not rows:
            return
        self._last = rows[-1].id
        logger = get_run_logger()
        for row in rows:
            self.sent[row.loop] += row.requests
            logger.info(
                "chunk of %d served by %s: %d failed, %.2f engine-seconds",
                row.requests,
                row.loop or "a loop",
                row.errors,
                row.seconds,
            )
        if self.flow_run_id is None:
            return
        try:
            with get_client(sync_client=True) as client:
                for row in rows:
                    self._count += 1
                    started: State[None] = Running(message=f"served by {row.loop or 'a loop'}")
                    task_run = client.create_task_run(
                        infer_chunk,
                        self.flow_run_id,
                        dynamic_key=str(self._count),
                        name=f"infer-chunk-{self._count}",
                        state=started,
                    )
                    client.set_task_run_state(
                        task_run.id,
                        Completed(
                            message=f"{row.requests} requests, {row.errors} failed, "
                            f"{row.seconds:.2f} engine-seconds, by {row.loop or 'a loop'}"
                        ),
                        force=True,
                    )
        except Exception as exc:  # a record, not the work: the batch goes on
            log.warning("could not record chunks of %s as task runs: %s", self.batch_id, exc)
