"""A batch as people see it: OpenAI's batch object, and the output and error files, renderings of
its `results` rows (`output_lines`). An API batch keeps no file: its outputs are virtual
(`store://<batch id>-output`, `-errors`), streamed from the rows on whichever node; a batch run on
files (a path, object storage) gets them written at finalize.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from typing import BinaryIO, Literal

import orjson

from offline_queue import eta
from offline_queue.batch_object import (
    BatchErrors,
    BatchObject,
    FinishEstimate,
    LineError,
    RequestCounts,
    RunStats,
    Usage,
)
from offline_queue.states import TERMINAL_STATUSES
from offline_queue.storage import locate, resolve, sibling
from offline_queue.store import gpu_time, outlook, results
from offline_queue.store.files import STORE_SCHEME
from offline_queue.store.tables import Batch
from offline_queue.submission import Submission

Kind = Literal["output", "errors"]
_DOWNLOAD_BLOCK = 1 << 20


class OutputsRemoved(FileNotFoundError):
    """The batch's outputs expired and the clean-up removed them (offline_queue/expiry.py)."""


def default_outputs(input: str) -> tuple[str, str]:
    """`x.jsonl` → `x.output.jsonl` and `x.errors.jsonl`, next to the input (a path, or an
    object-storage URL)."""
    stem = input.rpartition("/")[2].removesuffix(".jsonl")
    return sibling(input, f"{stem}.output.jsonl"), sibling(input, f"{stem}.errors.jsonl")


def virtual_outputs(batch_id: str) -> tuple[str, str]:
    """The output and error locations of a batch whose files are its result rows."""
    return f"{STORE_SCHEME}{batch_id}-output", f"{STORE_SCHEME}{batch_id}-errors"


def place_batch(
    input: str, output: str | None, errors: str | None, content_hash: str, batch_id: str | None
) -> Submission:
    """The batch of a submitted file: its id, and its input, output and error locations as
    stored (the rest of the submission at its defaults, for the caller to `replace`).

    The same content written to the same files is the same batch (its id derives from both),
    so a re-run resumes it. A file in the store has no directory to put outputs beside: unless
    told otherwise its outputs are virtual, and its id derives from the content and the file."""
    source = resolve(input)
    out = resolve(output) if output else None
    err = resolve(errors) if errors else None
    if source.startswith(STORE_SCHEME) and not (out and err):
        identity = f"{content_hash}\n{source}\n{out or ''}\n{err or ''}"
        bid = batch_id or f"batch_{hashlib.sha256(identity.encode()).hexdigest()[:24]}"
        virtual_out, virtual_err = virtual_outputs(bid)
        return Submission(bid, content_hash, source, out or virtual_out, err or virtual_err)
    default_out, default_err = default_outputs(source)
    out, err = out or default_out, err or default_err
    identity = f"{content_hash}\n{out}\n{err}"
    bid = batch_id or f"batch_{hashlib.sha256(identity.encode()).hexdigest()[:24]}"
    return Submission(bid, content_hash, source, out, err)


def batch_object(
    db: str, batch: Batch, run: RunStats | None = None, *, estimate: bool = False
) -> BatchObject:
    """The batch as OpenAI shows it. Its window and expiry are the batch's own (a 30m batch
    expires 30 minutes after creation); a batch run from the CLI has no window and no expiry.
    `estimate`: with its finish-time estimate while unfinished — for one batch's read, not for
    lists (it counts the live work of every other batch)."""
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
        route=batch.route,
        waiting_reason=batch.waiting_reason if not finished else None,
        engine_seconds=round(gpu_time.batch_seconds(db, batch.id), 3),
        estimate=finish_estimate(db, batch, p.pending) if estimate and not finished else None,
    )


def finish_estimate(db: str, batch: Batch, pending: int) -> FinishEstimate | None:
    e = eta.estimate(
        pending,
        batch.in_progress_at,
        batch.expires_at,
        outlook.outlook(db, batch.id, batch.tier, batch.created_at),
    )
    if e.finish_at is None or e.rate is None:
        return None
    return FinishEstimate(
        finish_at=round(e.finish_at),
        late=e.late,
        requests_per_second=round(e.rate, 3),
        requests_ahead=e.ahead,
    )


def file_line(row: results.ResultLine) -> bytes:
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


def output_lines(db: str, batch: Batch, kind: Kind) -> Iterator[bytes]:
    """The lines of the batch's output (or error) file in line order, streamed from its result
    rows: what `write_files` writes and what a download of a virtual file sends."""
    if batch.outputs_removed_at is not None:
        raise OutputsRemoved(f"the {kind} of {batch.id} expired and was removed")
    for row in results.iter_results(db, batch.id, ok=kind == "output"):
        yield file_line(row)


def output_source(db: str, batch: Batch, kind: Kind) -> Iterator[bytes]:
    """The content of a finished batch's output (or error) file, in blocks, wherever it is:
    streamed from the result rows when the file is virtual, else read from its location.
    Raises here, before the first block, when there is none (FileNotFoundError, OutputsRemoved),
    so a server can answer 404 instead of breaking off a response it has begun."""
    path = batch.output_path if kind == "output" else batch.error_path
    if batch.outputs_removed_at is not None:
        raise OutputsRemoved(f"the {kind} of {batch.id} expired and was removed")
    if path == virtual_outputs(batch.id)[0 if kind == "output" else 1]:
        return output_lines(db, batch, kind)
    place = locate(path, db)
    place.size()  # FileNotFoundError now rather than mid-stream

    def blocks() -> Iterator[bytes]:
        with place.open_read() as handle:
            while block := handle.read(_DOWNLOAD_BLOCK):
                yield block

    return blocks()


def write_files(db: str, batch: Batch) -> tuple[int, int]:
    """Write both files from the store, streaming, each appearing whole (a reader never sees half
    a file, and two workers finishing the same batch write the same bytes); (outputs, errors).
    A virtual file is not written: its rows are the file."""
    if batch.outputs_removed_at is not None:
        raise OutputsRemoved(f"the outputs of {batch.id} expired and were removed")
    virtual = virtual_outputs(batch.id)
    places = [
        None if path == name else locate(path, db)
        for path, name in zip((batch.output_path, batch.error_path), virtual, strict=True)
    ]
    if places == [None, None]:
        p = results.progress(db, batch.id)
        return p.completed, p.failed
    counts = [0, 0]
    with contextlib.ExitStack() as stack:
        outs: list[BinaryIO | None] = [
            stack.enter_context(place.writing()) if place else None for place in places
        ]
        for row in results.iter_results(db, batch.id):
            i = 0 if row.ok else 1
            counts[i] += 1
            out = outs[i]
            if out is not None:
                out.write(file_line(row))
    return counts[0], counts[1]
