"""The runs of the batches this API starts, and its watch over every batch's run. A run here is a
thread of its own per batch (one stuck on a dead engine holds up no other), owned by this process
(`API_OWNER`, beaten by the watch) until its flow run takes it: a kill -9 of the API leaves
batches the reaper settles. A run that raises fails its batch; a deployment's run is the owner
its batch waits for, with no heartbeat: waiting for a worker is not being lost.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from typing import TYPE_CHECKING, Any

from offline_queue.expiry import remove_expired
from offline_queue.store import owners
from offline_queue.store import responses as single_responses

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun

    from offline_queue.api.settings import ApiSettings

log = logging.getLogger(__name__)

API_OWNER = f"offline-queue api on {socket.gethostname()} (pid {os.getpid()})"
"""This process, as the owner of the batches waiting for its runner threads."""
WATCH_SECONDS = 5.0
"""How often the API beats for its waiting batches and reaps the store's lost ones."""


def run_here(
    settings: ApiSettings, batch_id: str, parameters: dict[str, Any], path: str, file_id: str
) -> None:
    """Run the batch on a thread of its own, served by this process's own serving loop on its
    route (one per route, kept for the process's life); a failure lands on the batch."""
    owners.take_ownership(settings.db, batch_id, API_OWNER, None, settings.lease_seconds)

    def run() -> None:
        from offline_queue.flows.batch import batch_inference
        from offline_queue.flows.waiting import SERVE_HERE_ENV

        os.environ[SERVE_HERE_ENV] = "1"

        try:
            batch_inference(**parameters)
        except BaseException as exc:
            log.exception("batch %s: the run failed", batch_id)
            _record_failure(settings.db, batch_id, reason(exc, path, file_id))

    threading.Thread(target=run, name=f"run-{batch_id}", daemon=True).start()


def reason(exc: BaseException, path: str, file_id: str) -> str:
    """Why a run ended, as the tenant may read it: no server paths."""
    text = str(exc).replace(path, file_id)[:500]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _record_failure(db: str, batch_id: str, why: str) -> None:
    """A run that raised before its flow took the batch (the flow's own hooks record the rest;
    a run whose process dies is left to the reaper: its owner stops beating)."""
    message = f"the API's run of this batch failed: {why}"
    try:
        if owners.fail_run(db, owners.RUN_FAILED, message, batch_id=batch_id):
            log.warning("batch %s failed: %s", batch_id, message)
    except Exception:  # the store is gone too: the reaper or a re-run ends it
        log.exception("batch %s: could not record how its run ended", batch_id)


def awaiting(settings: ApiSettings, batch_id: str, started: FlowRun) -> None:
    """The batch waits for the deployment's flow run `started` (Scheduled until a worker
    takes it): shown as its owner, found by the flow run's hooks."""
    owner = f"Prefect flow run {started.name} ({started.id}), waiting for a worker"
    owners.await_run(settings.db, batch_id, str(started.id), owner)


def watch_once(db: str) -> None:
    """Beat for the batches waiting here, settle lost runs, remove what has expired, close the
    single responses that have their answer."""
    owners.beat_owned(db, API_OWNER)
    for lost in owners.reap_orphans(db):
        log.warning("batch %s lost its run (owner %s)", lost.batch_id, lost.owner)
    remove_expired(db)  # logs what it removed
    single_responses.close(db)  # answered single responses: completed or failed, and told


async def watch(db: str) -> None:
    """Every WATCH_SECONDS while the API runs: `watch_once`, off the event loop."""
    while True:
        try:
            await asyncio.to_thread(watch_once, db)
        except Exception as exc:  # the store may be restarting: look again next time
            log.warning("batch watch failed: %s", exc)
        await asyncio.sleep(WATCH_SECONDS)
