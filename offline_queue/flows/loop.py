"""A node's serving loop as a Prefect flow run (`offline-queue worker loop`, which `worker start`
runs per GPU): the loop itself is offline_queue/loop.py; its run shows in the UI what it served
— a table of chunks and requests per batch, brought up to date as it serves — and ends when the
loop is drained."""

from __future__ import annotations

import contextvars
import signal
import socket
import threading
from collections import Counter

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from offline_queue.blocks.engines import load_engine_block, route_of
from offline_queue.blocks.store import store_url
from offline_queue.loop import ServingLoop, devices_here
from offline_queue.serving import ChunkReport
from offline_queue.webhooks import run_in_thread

REPORT_SECONDS = 10.0


class Served:
    """What the loop served, per batch, as the run's table artifact."""

    def __init__(self, loop: ServingLoop):
        self.loop = loop
        self.chunks: Counter[str] = Counter()
        self.requests: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._changed = False
        self.key = f"serving-loop-{socket.gethostname()}-{loop.id.rsplit(':', 1)[-1]}".lower()

    def add(self, batch_id: str, report: ChunkReport) -> None:
        with self._lock:
            self.chunks[batch_id] += 1
            self.requests[batch_id] += report.claimed
            self._changed = True

    def show(self) -> None:
        with self._lock:
            if not self._changed:
                return
            self._changed = False
            table = [
                {"batch": b, "chunks": self.chunks[b], "requests": self.requests[b]}
                for b in sorted(self.chunks)
            ]
        create_table_artifact(
            key=self.key, table=table, description=f"Served by {self.loop.id} ({self.loop.route})"
        )


def node_loop(
    engine: str | None, model: str | None, db: str, chunk_size: int, lease_seconds: float
) -> ServingLoop:
    """The loop a node runs on `engine`, its engine loaded, draining on SIGTERM and Ctrl-C."""
    chosen = load_engine_block(engine, model).engine()
    loop = ServingLoop(
        db,
        chosen,
        route_of(engine, model),
        chunk_size=chunk_size,
        lease_seconds=lease_seconds,
        devices=devices_here(),
    )
    signal.signal(signal.SIGTERM, lambda *_: loop.drain())
    signal.signal(signal.SIGINT, lambda *_: loop.drain())
    run_in_thread(db)  # the node delivers webhooks too: any process with the store may
    return loop


@flow(name="serving-loop")
def serving_loop(
    engine: str | None,
    model: str | None,
    db: str | None,
    store: str | None,
    chunk_size: int,
    lease_seconds: float,
) -> dict[str, int]:
    """Serve until drained (SIGTERM, `offline-queue worker drain`); the table of what was served
    is updated every REPORT_SECONDS. The store is `db` or the `store` block (its URL secret)."""
    loop = node_loop(engine, model, store_url(db, store), chunk_size, lease_seconds)
    served = Served(loop)
    loop.on_chunk = served.add
    log = get_run_logger()
    log.info("serving %s as %s (%s)", loop.route, loop.id, loop.engine.model_version)
    stop = threading.Event()

    def report() -> None:
        while not stop.wait(REPORT_SECONDS):
            try:
                served.show()
            except Exception as exc:  # a record: the serving goes on
                log.warning("could not update the served table: %s", exc)

    # The run's context goes along: the artifact is the run's, created from another thread.
    context = contextvars.copy_context()
    reporter = threading.Thread(
        target=context.run, args=(report,), name="served-report", daemon=True
    )
    reporter.start()
    try:
        loop.serve()
    finally:
        stop.set()
        served.show()
    log.info("drained after %d chunks, %d requests", loop.chunks, loop.requests)
    return {"chunks": loop.chunks, "requests": loop.requests}
