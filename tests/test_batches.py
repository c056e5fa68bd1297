"""The batch object people see (`offline-queue status`, the API) tells the batch's own window;
the lines of its output and error files have OpenAI's shape around the stored answer."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import orjson

from offline_queue.batches import batch_object, file_line
from offline_queue.store import batches
from offline_queue.store.db import session
from offline_queue.store.results import ResultLine
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


# ---- output and error file lines ---------------------------------------------------------


def row(**fields: Any) -> ResultLine:
    base: dict[str, Any] = {
        "line_no": 3,
        "custom_id": "req-3",
        "response_id": "batch_req_abc123",
        "ok": True,
        "status_code": 200,
        "body": '{"id": "chatcmpl-1", "choices": []}',
        "error_code": None,
        "error_message": None,
    }
    return ResultLine(**{**base, **fields})


def test_an_output_line_is_openais_shape_around_the_stored_body() -> None:
    raw = file_line(row())
    assert raw.endswith(b"\n") and raw.count(b"\n") == 1
    assert orjson.loads(raw) == {
        "id": "batch_req_abc123",
        "custom_id": "req-3",
        "response": {
            "status_code": 200,
            "request_id": "req_abc123",
            "body": {"id": "chatcmpl-1", "choices": []},
        },
        "error": None,
    }
    assert b'{"id": "chatcmpl-1", "choices": []}' in raw  # the stored bytes, not re-serialised


def test_an_engine_error_line_keeps_the_servers_answer() -> None:
    raw = file_line(
        row(
            ok=False,
            status_code=400,
            body='{"error": {"message": "too long"}}',
            error_code="context_length_exceeded",
            error_message="line 3: too long",
        )
    )
    assert orjson.loads(raw) == {
        "id": "batch_req_abc123",
        "custom_id": "req-3",
        "response": {
            "status_code": 400,
            "request_id": "req_abc123",
            "body": {"error": {"message": "too long"}},
        },
        "error": {"code": "context_length_exceeded", "message": "line 3: too long", "line": 3},
    }


def test_an_error_line_without_an_answer_has_a_null_response() -> None:
    raw = file_line(
        row(
            ok=False,
            custom_id=None,  # a line so broken it has no custom_id
            status_code=None,
            body=None,
            error_code="invalid_json",
            error_message="line 3: not JSON",
        )
    )
    assert orjson.loads(raw) == {
        "id": "batch_req_abc123",
        "custom_id": None,
        "response": None,
        "error": {"code": "invalid_json", "message": "line 3: not JSON", "line": 3},
    }


def test_a_line_escapes_what_it_did_not_build() -> None:
    tricky = 'a"b\\c\né'
    line = orjson.loads(file_line(row(custom_id=tricky, ok=False, error_message=tricky)))
    assert line["custom_id"] == tricky and line["error"]["message"] == tricky
    assert orjson.loads(file_line(row(body=None)))["response"]["body"] is None
