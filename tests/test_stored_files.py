"""Files held in the store, on SQLite and PostgreSQL: streamed in and invisible until
committed, refused uploads that leave nothing, pagination and delete, batches whose input is
a stored file, outputs streamed from the result rows, expiry, and bounded memory."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from sqlalchemy import func, select

from offline_queue import expiry as cleanup
from offline_queue.batches import (
    OutputsRemoved,
    batch_object,
    output_lines,
    output_source,
    place_batch,
    virtual_outputs,
    write_files,
)
from offline_queue.engines.base import Reply
from offline_queue.files import UploadRefused, delete_file, store_upload
from offline_queue.queue_file import queue_batch_file
from offline_queue.states import BatchStatus
from offline_queue.storage import (
    StoreFile,
)
from offline_queue.store import batches, claims, expiry, files, ingest
from offline_queue.store.db import session
from offline_queue.store.files import CHUNK_BYTES, FileInUse, FileWriter, Upload, open_chunks
from offline_queue.store.tables import FileChunk, Request, StoredFile
from offline_queue.validate import Limits, inspect_file


def request_line(i: int, bad: bool = False) -> bytes:
    body: dict[str, Any] = {
        "model": "smollm2",
        "max_tokens": -1 if bad else 4,
        "temperature": 0.7,
        "seed": i,
        "messages": [{"role": "user", "content": f"Say fact {i}."}],
    }
    line = {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions"}
    return json.dumps({**line, "body": body}).encode() + b"\n"


def content(n_lines: int) -> bytes:
    """Lines of varied length (some cross chunk boundaries), the last without a newline."""
    parts = [b"%d:" % i + b"y" * (i * 7919 % 3000) + b"\n" for i in range(n_lines)]
    return b"".join(parts) + b"tail without newline"


def chunks_of(db: str, file_id: str) -> int:
    with session(db) as s:
        return int(s.scalar(select(func.count()).where(FileChunk.file_id == file_id)) or 0)


def test_a_streamed_file_is_invisible_until_committed_then_reads_back_equal(db_url: str) -> None:
    data = content(8000)
    assert len(data) > (files.COMMIT_EVERY + 2) * CHUNK_BYTES
    writer = FileWriter(db_url, Upload("t1", "in.jsonl", "batch"))
    for start in range(0, len(data), 100_003):  # blocks that do not align with chunks
        writer.write(data[start : start + 100_003])
        assert files.get_file(db_url, writer.file_id) is None
        with pytest.raises(FileNotFoundError):
            open_chunks(db_url, writer.file_id)
    assert chunks_of(db_url, writer.file_id) >= files.COMMIT_EVERY  # committed as it went
    assert files.list_files(db_url, "t1")[0] == []
    row = writer.commit(lines=8001, sha256="h")
    assert row.bytes == len(data) and row.status == "ready"

    with open_chunks(db_url, writer.file_id) as handle:
        assert handle.read() == data
    with StoreFile(db_url, writer.file_id).open_read() as handle:
        lines = []
        while line := handle.readline(1 << 20):
            lines.append(line)
    assert lines == data.splitlines(keepends=True)
    assert lines[-1] == b"tail without newline"
    with open_chunks(db_url, writer.file_id) as handle:  # a bounded readline cuts a line
        assert handle.readline(5) == b"0:\n"
        assert handle.readline(5) == b"1:" + b"y" * 3
    assert StoreFile(db_url, writer.file_id).size() == len(data)


def test_an_aborted_write_leaves_nothing(db_url: str) -> None:
    writer = FileWriter(db_url, Upload("t1", "in.jsonl", "batch"))
    writer.write(b"z" * (CHUNK_BYTES * (files.COMMIT_EVERY + 1)))
    assert chunks_of(db_url, writer.file_id) > 0
    writer.abort()
    assert chunks_of(db_url, writer.file_id) == 0
    with session(db_url) as s:
        assert s.get(StoredFile, writer.file_id) is None


async def blocks_of(data: bytes, size: int = 65536) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def test_uploads_check_limits_as_blocks_arrive_and_leave_nothing_when_refused(
    db_url: str, tmp_path: Path
) -> None:
    data = b"".join(request_line(i) for i in range(50))
    limits = Limits(max_file_bytes=len(data) - 1)
    with pytest.raises(UploadRefused) as refused:
        asyncio.run(store_upload(blocks_of(data), limits, Upload("t", "a", "batch"), db=db_url))
    assert refused.value.status == 413
    with session(db_url) as s:
        assert s.scalar(select(func.count()).select_from(StoredFile)) == 0
        assert s.scalar(select(func.count()).select_from(FileChunk)) == 0

    # Under a root (a directory here; object storage the same): the bytes there, the row here.
    root = tmp_path / "uploads"
    row = asyncio.run(
        store_upload(
            blocks_of(data + b"x"),
            Limits(max_line_bytes=10_000),
            Upload("t", "a", "batch"),
            db=db_url,
            root=str(root),
        )
    )
    assert Path(row.path).read_bytes() == data + b"x" and row.lines == 51
    assert delete_file(db_url, row.id) and not Path(row.path).exists()


def test_delete_and_list_files_with_pagination(db_url: str) -> None:
    ids = []
    for i in range(5):
        w = FileWriter(db_url, Upload("t1", f"f{i}", "batch"))
        w.write(b"line\n")
        ids.append(w.commit(lines=1, sha256=str(i)).id)
    other = FileWriter(db_url, Upload("t2", "x", "batch"))
    other.write(b"line\n")
    theirs = other.commit(lines=1, sha256="x").id

    def listing(**kw: Any) -> list[str]:
        got: list[str] = []
        after = None
        while True:
            page, more = files.list_files(db_url, "t1", limit=2, after=after, **kw)
            got += [f.id for f in page]
            if not more:
                return got
            after = page[-1].id

    newest_first = listing()
    assert sorted(newest_first) == sorted(ids) and theirs not in newest_first
    assert listing(order="asc") == newest_first[::-1]
    assert files.list_files(db_url, "t1", purpose="fine-tune")[0] == []
    # another tenant's id as the cursor is ignored: no way to probe across tenants
    assert [f.id for f in files.list_files(db_url, "t1", after=theirs)[0]] == newest_first

    assert delete_file(db_url, ids[0])
    assert files.get_file(db_url, ids[0]) is None and chunks_of(db_url, ids[0]) == 0
    assert not delete_file(db_url, ids[0])
    assert ids[0] not in listing()


def upload(db: str, data: bytes, tenant: str = "t1") -> StoredFile:
    return asyncio.run(store_upload(blocks_of(data), Limits(), Upload(tenant, "in", "b"), db=db))


def test_a_batch_whose_input_is_in_the_store_validates_and_queues_from_it(db_url: str) -> None:
    lines = [request_line(i, bad=i % 4 == 1) for i in range(12)]
    data = b"\r\n".join(x.rstrip(b"\n") for x in lines)  # CRLF, no final newline
    row = upload(db_url, data)
    assert row.path == f"store://{row.id}" and row.lines == 12
    info = inspect_file(StoreFile(db_url, row.id), Limits())
    assert info.content_hash == row.sha256 and info.lines == 12

    placed = place_batch(row.path, None, None, info.content_hash, None)
    bid = placed.id
    assert (placed.output_path, placed.error_path) == virtual_outputs(bid)
    _, created = batches.register_batch(db_url, placed)
    assert created
    with pytest.raises(FileInUse):  # its lines are not queued yet
        delete_file(db_url, row.id)
    queue_batch_file(db_url, bid, own_process=False)
    accepted, total = ingest.finish_ingest(db_url, bid)
    assert (accepted, total) == (9, 12)
    with session(db_url) as s:
        queued = list(s.scalars(select(Request.custom_id).where(Request.batch_id == bid)))
    assert sorted(queued) == sorted(f"req-{i}" for i in range(12) if i % 4 != 1)
    assert delete_file(db_url, row.id)  # queued: the batch no longer reads its file


def test_a_stored_file_is_queued_the_same_in_its_own_process(db_url: str) -> None:
    row = upload(db_url, b"".join(request_line(i) for i in range(20)))
    bid = batches.register_batch(db_url, place_batch(row.path, None, None, row.sha256, None))[0].id
    queue_batch_file(db_url, bid, own_process=True)  # the child reads the store, no disk
    assert ingest.finish_ingest(db_url, bid) == (20, 20)


def finished_batch(db: str, tmp_path: Path, output: str | None = None) -> str:
    """A batch from a stored file, every accepted line answered, with its error rows."""
    row = upload(db, b"".join(request_line(i, bad=i % 3 == 0) for i in range(9)))
    errors = str(tmp_path / "err.jsonl") if output else None
    bid = batches.register_batch(db, place_batch(row.path, output, errors, row.sha256, None))[0].id
    queue_batch_file(db, bid, own_process=False)
    ingest.finish_ingest(db, bid)
    c = claims.claim(db, bid, "w", 100, lease_seconds=60)
    assert c is not None
    reply = Reply(ok=True, body='{"ok": true}', prompt_tokens=3, completion_tokens=2)
    claims.settle(db, bid, c, [claims.Outcome(r, reply) for r in c.requests], 3)
    batches.set_status(db, bid, BatchStatus.COMPLETED)
    return bid


def test_output_lines_streamed_from_results_equal_the_written_files(
    db_url: str, tmp_path: Path
) -> None:
    bid = finished_batch(db_url, tmp_path, output=str(tmp_path / "out.jsonl"))
    batch = batches.get_batch(db_url, bid)
    assert batch is not None
    assert write_files(db_url, batch) == (6, 3)
    written_out = (tmp_path / "out.jsonl").read_bytes()
    written_err = (tmp_path / "err.jsonl").read_bytes()
    assert b"".join(output_lines(db_url, batch, "output")) == written_out
    assert b"".join(output_lines(db_url, batch, "errors")) == written_err
    assert b"".join(output_source(db_url, batch, "output")) == written_out
    assert len(written_out.splitlines()) == 6 and len(written_err.splitlines()) == 3

    # The same batch with virtual files: nothing is written, the download is the same bytes.
    virtual = finished_batch(db_url, tmp_path / "v")
    vbatch = batches.get_batch(db_url, virtual)
    assert vbatch is not None and vbatch.output_path == virtual_outputs(virtual)[0]
    assert write_files(db_url, vbatch) == (6, 3)
    downloaded = b"".join(output_source(db_url, vbatch, "output"))

    def answers(file: bytes) -> list[tuple[str, Any]]:  # response ids differ batch to batch
        return [(x["custom_id"], x["response"]["body"]) for x in map(json.loads, file.splitlines())]

    assert answers(downloaded) == answers(written_out) and len(answers(downloaded)) == 6


def test_the_clean_up_removes_expired_outputs_and_files_and_says_so(
    db_url: str, tmp_path: Path
) -> None:
    bid = finished_batch(db_url, tmp_path, output=str(tmp_path / "out.jsonl"))
    kept = finished_batch(db_url, tmp_path / "kept")
    batch = batches.get_batch(db_url, bid)
    assert batch is not None
    write_files(db_url, batch)
    expiry.set_output_expiry(db_url, bid, -1)  # expired a second before it was created
    expiry.set_output_expiry(db_url, kept, 3600)
    old = files.add_file(
        db_url, Upload("t", "o", "batch", expires_at=1), file_id="file-old",
        path=str(tmp_path / "old.jsonl"), size=1, lines=1, sha256="s",
    )  # fmt: skip
    Path(old.path).write_bytes(b"{}\n")
    FileWriter(db_url, Upload("t", "crashed", "batch"))  # never finished
    before = batches.get_batch(db_url, bid)

    removed = cleanup.remove_expired(db_url)
    assert removed == cleanup.Removed(batches=1, result_rows=9, output_files=2, files=1)
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "err.jsonl").exists()
    assert not Path(old.path).exists() and files.get_file(db_url, "file-old") is None
    after = batches.get_batch(db_url, bid)
    assert after is not None and after.outputs_removed_at is not None
    with pytest.raises(OutputsRemoved):
        output_source(db_url, after, "output")
    assert before is not None
    # what the batch did is still told: the counts come from the rows that stay
    assert batch_object(db_url, after).request_counts == batch_object(db_url, before).request_counts
    kept_batch = batches.get_batch(db_url, kept)
    assert kept_batch is not None and len(list(output_lines(db_url, kept_batch, "output"))) == 6

    # the unfinished upload is removed once it is stale, and a second pass removes nothing
    with session(db_url) as s:
        for row in s.scalars(select(StoredFile).where(StoredFile.status == "writing")):
            row.created_at -= expiry.STALE_UPLOAD_SECONDS + 1
    assert cleanup.remove_expired(db_url).files == 1
    assert cleanup.remove_expired(db_url) == cleanup.Removed(0, 0, 0, 0)


# -- streaming ----------------------------------------------------------------------------------


def test_reading_a_large_stored_file_keeps_memory_bounded(pg_url: str) -> None:
    """50 MB through the writer and back line by line: the process grows by far less than the
    file (chunks are committed as they come and fetched a few at a time)."""
    me = psutil.Process()
    line = request_line(0)
    block = line * (65536 // len(line))
    total = 50 << 20
    base = me.memory_info().rss
    peak = base
    writer = FileWriter(pg_url, Upload("t", "big", "batch"))
    written = 0
    while written < total:
        writer.write(block)
        written += len(block)
        peak = max(peak, me.memory_info().rss)
    writer.commit(lines=written // len(line), sha256="big")
    seen = read = 0
    with StoreFile(pg_url, writer.file_id).open_read() as handle:
        while raw := handle.readline(1 << 20):
            read += len(raw)
            seen += 1
            if seen % 5000 == 0:
                peak = max(peak, me.memory_info().rss)
    assert read == written
    assert peak - base < 30 << 20, f"grew {(peak - base) >> 20} MiB for a 50 MiB file"
