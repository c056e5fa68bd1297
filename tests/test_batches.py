"""The batch object people see (`offline-queue status`, the API) tells the batch's own window."""

from __future__ import annotations

import os
import time
from pathlib import Path

import orjson

from offline_queue.batches import batch_object
from offline_queue.store import batches
from offline_queue.store.db import session
from offline_queue.store.tables import Batch
from tests.conftest import run_cli
from tests.test_store import submission


def add_batch(db: str, tmp_path: Path, **fields: object) -> Batch:
    """A batch row as the API writes it, with a window of its own."""
    now = int(time.time())
    row = {
        "id": "batch_window",
        "content_hash": "c" * 64,
        "input_path": str(tmp_path / "in.jsonl"),
        "output_path": str(tmp_path / "out.jsonl"),
        "error_path": str(tmp_path / "err.jsonl"),
        "status": "in_progress",
        "endpoint": "/v1/chat/completions",
        "created_at": now,
        "tenant": "acme",
        "input_file_id": "file-abc",
        **fields,
    }
    with session(db) as s:
        s.add(Batch(**row))
    batch = batches.get_batch(db, str(row["id"]))
    assert batch is not None
    return batch


def test_a_30_minute_batch_expires_30_minutes_after_creation(db_url: str, tmp_path: Path) -> None:
    created = int(time.time()) - 60
    batch = add_batch(
        db_url, tmp_path, created_at=created, completion_window="30m", expires_at=created + 1800
    )
    obj = batch_object(db_url, batch)
    assert obj.completion_window == "30m"
    assert obj.expires_at == created + 1800  # not created + 24 h
    assert obj.input_file_id == "file-abc"

    # What `offline-queue status` prints is that same object.
    shown = run_cli("status", batch.id, "--db", db_url, "--json", env=dict(os.environ))
    assert shown.returncode == 0, shown.stderr
    data = orjson.loads(shown.stdout)
    assert (data["completion_window"], data["expires_at"]) == ("30m", created + 1800)
    table = run_cli("status", batch.id, "--db", db_url, env=dict(os.environ))
    assert table.returncode == 0, table.stderr
    assert "(30m window)" in table.stdout


def test_a_batch_object_carries_its_cancel_and_expiry_times(db_url: str, tmp_path: Path) -> None:
    created = int(time.time()) - 100
    batch = add_batch(
        db_url,
        tmp_path,
        status="expired",
        created_at=created,
        completion_window="90s",
        expires_at=created + 90,
        cancelling_at=created + 10,
        cancelled_at=created + 20,
        expired_at=created + 91,
    )
    obj = batch_object(db_url, batch)
    assert (obj.expires_at, obj.expired_at) == (created + 90, created + 91)
    assert (obj.cancelling_at, obj.cancelled_at) == (created + 10, created + 20)


def test_a_cli_batch_has_no_window_and_never_expires(db_url: str, tmp_path: Path) -> None:
    batch, created = batches.register_batch(db_url, submission("batch_cli", "d" * 64, tmp_path))
    assert created
    obj = batch_object(db_url, batch)
    assert obj.expires_at is None and obj.completion_window is None
