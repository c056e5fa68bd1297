"""A batch as people see it: OpenAI's batch object, and the output and error files."""

from __future__ import annotations

import os
from pathlib import Path

import orjson

from offline_queue.formats import (
    BatchErrors,
    BatchObject,
    LineError,
    RequestCounts,
    RunStats,
    Usage,
)
from offline_queue.states import TERMINAL_STATUSES
from offline_queue.store import results
from offline_queue.store.tables import Batch


def default_outputs(input_path: Path) -> tuple[Path, Path]:
    """`x.jsonl` → `x.output.jsonl` and `x.errors.jsonl`, next to the input."""
    stem = input_path.name.removesuffix(".jsonl")
    return input_path.with_name(f"{stem}.output.jsonl"), input_path.with_name(
        f"{stem}.errors.jsonl"
    )


def batch_object(db: str, batch: Batch, run: RunStats | None = None) -> BatchObject:
    """The batch as OpenAI shows it. Its window and expiry are the batch's own (a 30m batch
    expires 30 minutes after creation); a batch run from the CLI has no window and no expiry."""
    p = results.progress(db, batch.id)
    total = batch.total_lines if batch.ingest_done else p.completed + p.failed + p.pending
    finished = batch.status in TERMINAL_STATUSES
    errors = None
    if batch.errors_json:
        errors = BatchErrors(data=[LineError(**e) for e in orjson.loads(batch.errors_json)])
    return BatchObject(
        id=batch.id,
        endpoint=batch.endpoint,
        errors=errors,
        input_file_id=batch.input_file_id or f"file-{batch.content_hash[:24]}",
        completion_window=batch.completion_window,
        status=batch.status,  # type: ignore[arg-type]
        output_file_id=f"{batch.id}-output" if finished else None,
        error_file_id=f"{batch.id}-errors" if finished else None,
        created_at=batch.created_at,
        in_progress_at=batch.in_progress_at,
        expires_at=batch.expires_at,
        finalizing_at=batch.finalizing_at,
        completed_at=batch.completed_at,
        failed_at=batch.failed_at,
        expired_at=batch.expired_at,
        cancelling_at=batch.cancelling_at,
        cancelled_at=batch.cancelled_at,
        request_counts=RequestCounts(total=total, completed=p.completed, failed=p.failed),
        metadata=orjson.loads(batch.metadata_json) if batch.metadata_json else None,
        usage=Usage(
            input_tokens=p.prompt_tokens,
            output_tokens=p.completion_tokens,
            total_tokens=p.prompt_tokens + p.completion_tokens,
        ),
        model_version=batch.model_version,
        input_file=batch.input_path,
        output_file=batch.output_path if finished else None,
        error_file=batch.error_path if finished else None,
        run=run,
    )


def _line(row: results.ResultLine) -> bytes:
    """One file line, built around the stored body without parsing it again."""
    request_id = "req_" + row.response_id.removeprefix("batch_req_")
    head = (
        b'{"id":' + orjson.dumps(row.response_id) + b',"custom_id":' + orjson.dumps(row.custom_id)
    )
    if row.ok:
        response = (
            b'{"status_code":200,"request_id":'
            + orjson.dumps(request_id)
            + b',"body":'
            + (row.body or "null").encode()
            + b"}"
        )
        return head + b',"response":' + response + b',"error":null}\n'
    response = b"null"
    if row.status_code is not None:
        response = (
            b'{"status_code":'
            + str(row.status_code).encode()
            + b',"request_id":'
            + orjson.dumps(request_id)
            + b',"body":'
            + (row.body or "null").encode()
            + b"}"
        )
    error = orjson.dumps(
        {"code": row.error_code, "message": row.error_message, "line": row.line_no}
    )
    return head + b',"response":' + response + b',"error":' + error + b"}\n"


def write_files(db: str, batch: Batch) -> tuple[int, int]:
    """Write both files from the store, streaming, each swapped into place whole (a reader never
    sees half a file, and two workers finishing the same batch write the same bytes)."""
    out_path, err_path = Path(batch.output_path), Path(batch.error_path)
    out_tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    err_tmp = err_path.with_name(f".{err_path.name}.{os.getpid()}.tmp")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    err_path.parent.mkdir(parents=True, exist_ok=True)
    outputs = errors = 0
    with out_tmp.open("wb") as out, err_tmp.open("wb") as err:
        for row in results.iter_results(db, batch.id):
            if row.ok:
                out.write(_line(row))
                outputs += 1
            else:
                err.write(_line(row))
                errors += 1
    os.replace(out_tmp, out_path)
    os.replace(err_tmp, err_path)
    return outputs, errors
