"""Validate and queue a batch's file, resumably; a large file (from `OWN_PROCESS_MIN_BYTES`) in a
process of its own, so that validation and the worker's claims and settles each get a core
instead of taking turns on one interpreter lock.
(docs/ARCHITECTURE.md, Why the parts are as they are)
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from offline_queue.catalog import Catalog
from offline_queue.storage import locate
from offline_queue.store import batches, ingest
from offline_queue.store.db import ENV_VAR
from offline_queue.validate import Limits, validate_file

OWN_PROCESS_MIN_BYTES = 16 << 20
"""Files at least this large (~75,000 chat lines) are queued in a process of their own; the
environment variable OFFLINE_QUEUE_OWN_PROCESS_MIN_BYTES overrides it (0: always)."""
_MIN_BYTES_VAR = "OFFLINE_QUEUE_OWN_PROCESS_MIN_BYTES"
_ERROR_TAIL = 4000


class IngestProcessFailed(RuntimeError):
    """The ingest process exited with an error; its stderr's end is in the message."""


def queue_batch_file(
    db: str, batch_id: str, own_process: bool | None = None, group_size: int = 5000
) -> None:
    """Validate the batch's file and queue its lines, from where an earlier pass stopped,
    `group_size` lines per transaction (see `offline_queue.store.ingest`).

    `own_process` None decides by the file's size (OWN_PROCESS_MIN_BYTES)."""
    batch = batches.get_batch(db, batch_id)
    if batch is None:
        raise KeyError(batch_id)
    if batch.ingest_done:
        return
    source = locate(batch.input_path, db)
    if own_process is None:
        floor = int(os.environ.get(_MIN_BYTES_VAR, OWN_PROCESS_MIN_BYTES))
        own_process = source.size() >= floor
    if own_process:
        _in_own_process(db, batch_id, group_size)
        return
    seen = ingest.known_custom_ids(db, batch_id) if batch.ingested_through else None
    # A routed batch's lines must name its model; one run on a named engine is not checked.
    catalog = Catalog.from_json(batch.catalog_json) if batch.catalog_json else None
    served = catalog.find(batch.served_model) if catalog is not None else None
    lines = validate_file(source, Limits(), batch.ingested_through, seen, catalog, served)
    ingest.ingest(db, batch_id, lines, group_size)


def _in_own_process(db: str, batch_id: str, group_size: int) -> None:
    # This checkout first on the child's path: it must run the code its parent runs.
    here = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, ENV_VAR: db, "PYTHONPATH": path}
    with tempfile.TemporaryFile() as stderr:
        child = subprocess.Popen(
            [sys.executable, "-m", "offline_queue.queue_file", batch_id, str(group_size)],
            stdin=subprocess.PIPE,  # held open while we wait: its end tells the child we died
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=env,
        )
        try:
            code = child.wait()
        finally:
            if child.poll() is None:  # we were interrupted (a cancelled run): so is the child
                child.kill()
                child.wait()
            assert child.stdin is not None
            child.stdin.close()
        if code != 0:
            stderr.seek(0)
            tail = stderr.read().decode(errors="replace")[-_ERROR_TAIL:]
            raise IngestProcessFailed(
                f"ingest of {batch_id} in its own process exited with {code}:\n{tail}"
            )


def _exit_when_parent_dies() -> None:
    # The raw descriptor, not sys.stdin: a daemon thread blocked in a buffered read holds its
    # lock, and the interpreter's shutdown would abort on it.
    while os.read(0, 4096):
        pass  # the parent never writes; only the end of file (its end closed) matters
    os._exit(75)


def main() -> None:
    threading.Thread(target=_exit_when_parent_dies, daemon=True).start()
    batch_id, group_size = sys.argv[1], int(sys.argv[2])
    queue_batch_file(os.environ[ENV_VAR], batch_id, own_process=False, group_size=group_size)


if __name__ == "__main__":
    main()
