"""What tests and benchmarks read back from the store about a batch they ran: its row, found by
the input file it was run on, and when its chunks were committed."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from offline_queue.store.db import session
from offline_queue.store.tables import Batch, Result


def batch_of(store: str, path: Path) -> Batch | None:
    with session(store) as s:
        return s.scalar(select(Batch).where(Batch.input_path == str(path)))


def result_times(store: str, batch_id: str) -> list[float]:
    """The distinct commit times of the batch's result rows: one per chunk settled."""
    with session(store) as s:
        return sorted(set(s.scalars(select(Result.created_at).where(Result.batch_id == batch_id))))
