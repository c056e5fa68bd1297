"""The `files` and `file_chunks` tables: files uploaded through /v1/files, and the bytes of those
held in the store (nodes share no disk) as rows of about a MiB, written while the upload streams
in (`FileWriter`) and read back as a stream (`open_chunks`). A `writing` file is invisible until
the transaction that writes its last chunk. A file kept elsewhere has only its row here (`path`).
"""

from __future__ import annotations

import io
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import delete, func, insert, select, text, update
from sqlalchemy.orm import Session

from offline_queue.states import TERMINAL_STATUSES
from offline_queue.store import clock
from offline_queue.store.db import session
from offline_queue.store.tables import Batch, FileChunk, StoredFile

CHUNK_BYTES = 1 << 20
"""The size of a chunk row: large enough that a 200 MB file is 200 rows, small enough that
neither database holds an unusual value and a reader holds a few at a time."""
COMMIT_EVERY = 8
"""Chunks a writer holds before it commits them: an upload never sits whole in a transaction
(or in memory); at most this many MiB do."""
FETCH_CHUNKS = 4
"""Chunks a reader fetches per query: fewer round trips, a bounded buffer."""

STORE_SCHEME = "store://"


class FileInUse(Exception):
    """A batch still reads the file (its lines are not all queued yet): it cannot go now."""

    def __init__(self, file_id: str, batch_ids: list[str]):
        super().__init__(
            f"{file_id} is being read by {', '.join(batch_ids)}: delete it once "
            "validation has finished"
        )
        self.file_id, self.batch_ids = file_id, batch_ids


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex[:24]}"


def store_path(file_id: str) -> str:
    """The location of a file held in the store (offline_queue/storage.py opens it)."""
    return STORE_SCHEME + file_id


class StorageQuotaExceeded(Exception):
    """The tenant's files would hold more bytes than its key allows: the API's 413."""

    def __init__(self, stored: int, limit: int):
        super().__init__(
            f"your files hold {stored} bytes; with this one they would pass your quota of "
            f"{limit} bytes (max_stored_bytes)"
        )


@dataclass(frozen=True)
class Upload:
    """Who uploads a file and what for, known before its first byte: the row's tenant, name
    and purpose, when it expires (None: never), and the quota the tenant's files must stay
    within once it is whole (None: none)."""

    tenant: str
    filename: str
    purpose: str
    expires_at: int | None = None
    max_stored_bytes: int | None = None


def add_file(
    db: str,
    upload: Upload,
    *,
    file_id: str,
    path: str,
    size: int,
    lines: int,
    sha256: str,
    endpoint: str | None = None,
) -> StoredFile:
    """The row of a file whose bytes are already whole elsewhere (`path`), only while the
    tenant's files stay within its quota (one check per tenant at a time on PostgreSQL; SQLite
    has one writer anyway)."""
    with session(db) as s:
        _within_quota(s, upload.tenant, size, upload.max_stored_bytes)
        row = StoredFile(
            id=file_id,
            tenant=upload.tenant,
            filename=upload.filename,
            purpose=upload.purpose,
            expires_at=upload.expires_at,
            bytes=size,
            lines=lines,
            sha256=sha256,
            endpoint=endpoint,
            path=path,
            created_at=clock.seconds(s),  # the store's: the clean-up judges age by it
            status="ready",
        )
        s.add(row)
    return row


def _within_quota(s: Session, tenant: str, size: int, max_stored_bytes: int | None) -> None:
    """Raise StorageQuotaExceeded unless the tenant's files and `size` more stay within
    `max_stored_bytes` (None: no quota). One check per tenant at a time on PostgreSQL (an
    advisory lock held to the commit); SQLite has one writer anyway."""
    if max_stored_bytes is None:
        return
    if s.get_bind().dialect.name == "postgresql":
        s.execute(text("SELECT pg_advisory_xact_lock(hashtext(:t))"), {"t": f"files:{tenant}"})
    stored = int(
        s.scalar(
            select(func.coalesce(func.sum(StoredFile.bytes), 0)).where(
                StoredFile.tenant == tenant, StoredFile.status == "ready"
            )
        )
        or 0
    )
    if stored + size > max_stored_bytes:
        raise StorageQuotaExceeded(stored, max_stored_bytes)


def get_file(db: str, file_id: str) -> StoredFile | None:
    """The file, once it is whole (an upload still streaming in is not there yet)."""
    with session(db, readonly=True) as s:
        row = s.get(StoredFile, file_id)
        return row if row is not None and row.status == "ready" else None


def list_files(
    db: str,
    tenant: str,
    *,
    purpose: str | None = None,
    limit: int = 10000,
    after: str | None = None,
    order: Literal["asc", "desc"] = "desc",
) -> tuple[list[StoredFile], bool]:
    """A page of the tenant's files by creation time (`order`), and whether more follow.
    `after` is the last id of the previous page; another tenant's id, or an unknown one, is
    ignored (ids never cross tenants)."""
    with session(db, readonly=True) as s:
        q = select(StoredFile).where(StoredFile.tenant == tenant, StoredFile.status == "ready")
        if purpose:
            q = q.where(StoredFile.purpose == purpose)
        anchor = s.get(StoredFile, after) if after else None
        if anchor is not None and anchor.tenant == tenant:
            if order == "desc":
                q = q.where(
                    (StoredFile.created_at < anchor.created_at)
                    | ((StoredFile.created_at == anchor.created_at) & (StoredFile.id < anchor.id))
                )
            else:
                q = q.where(
                    (StoredFile.created_at > anchor.created_at)
                    | ((StoredFile.created_at == anchor.created_at) & (StoredFile.id > anchor.id))
                )
        keys = (StoredFile.created_at, StoredFile.id)
        q = q.order_by(*(k.desc() for k in keys) if order == "desc" else keys)
        rows = list(s.scalars(q.limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def delete_file(db: str, file_id: str) -> StoredFile | None:
    """Delete the file's row and the chunks it holds in the store, in one transaction; the
    deleted row (None if there was none). Refused with FileInUse while a batch still has lines
    to read from it: once a batch's lines are queued it no longer reads its file, so deleting
    the file then changes nothing for the batch."""
    with session(db) as s:
        row = s.get(StoredFile, file_id)
        if row is None or row.status != "ready":
            return None
        readers = list(
            s.scalars(
                select(Batch.id).where(
                    (Batch.input_file_id == file_id) | (Batch.input_path == store_path(file_id)),
                    Batch.ingest_done.is_(False),
                    Batch.status.not_in(list(TERMINAL_STATUSES)),
                )
            )
        )
        if readers:
            raise FileInUse(file_id, readers)
        s.execute(delete(FileChunk).where(FileChunk.file_id == file_id))
        s.delete(row)
    return row


def remove_rows(db: str, file_ids: list[str]) -> int:
    """Delete files' rows and chunks whatever their state (the clean-up's, for files that
    expired or uploads that never finished); how many rows went."""
    if not file_ids:
        return 0
    with session(db) as s:
        s.execute(delete(FileChunk).where(FileChunk.file_id.in_(file_ids)))
        result: Any = s.execute(delete(StoredFile).where(StoredFile.id.in_(file_ids)))
        return int(result.rowcount or 0)


class FileWriter:
    """A file streamed into the store: `write` blocks as they arrive, then `commit` (the file
    appears, whole) or `abort` (nothing is left). Chunks are committed every COMMIT_EVERY, so a
    200 MB upload is never one transaction nor in memory; until `commit` its row says `writing`
    and no reader sees it. A writer that dies midway leaves a `writing` row that the clean-up
    removes (offline_queue/expiry.py)."""

    def __init__(self, db: str, upload: Upload, file_id: str | None = None):
        self.db, self.upload = db, upload
        self.file_id = file_id or new_file_id()
        self.bytes = 0
        self._buffer = bytearray()
        self._pending: list[bytes] = []
        self._seq = 0
        self._open = True
        with session(db) as s:
            s.add(
                StoredFile(
                    id=self.file_id,
                    tenant=upload.tenant,
                    filename=upload.filename,
                    purpose=upload.purpose,
                    bytes=0,
                    lines=0,
                    sha256="",
                    path=store_path(self.file_id),
                    created_at=clock.now_seconds(),  # a stale upload is judged by it
                    status="writing",
                )
            )

    def write(self, block: bytes) -> int:
        if not self._open:
            raise ValueError(f"{self.file_id}: the writer is closed")
        self._buffer += block
        self.bytes += len(block)
        while len(self._buffer) >= CHUNK_BYTES:
            self._pending.append(bytes(self._buffer[:CHUNK_BYTES]))
            del self._buffer[:CHUNK_BYTES]
        if len(self._pending) >= COMMIT_EVERY:
            with session(self.db) as s:
                self._insert_pending(s)
        return len(block)

    def _insert_pending(self, s: Any) -> None:
        if not self._pending:
            return
        rows = [
            {"file_id": self.file_id, "seq": self._seq + i, "data": data}
            for i, data in enumerate(self._pending)
        ]
        s.execute(insert(FileChunk), rows)
        self._seq += len(rows)
        self._pending = []

    def commit(self, *, lines: int, sha256: str, endpoint: str | None = None) -> StoredFile:
        """The last chunks and the row's `ready` in one transaction: the file appears whole —
        only while the tenant's files stay within the upload's quota (else
        StorageQuotaExceeded, and the caller aborts)."""
        if not self._open:
            raise ValueError(f"{self.file_id}: the writer is closed")
        if self._buffer:
            self._pending.append(bytes(self._buffer))
            self._buffer.clear()
        with session(self.db) as s:
            _within_quota(s, self.upload.tenant, self.bytes, self.upload.max_stored_bytes)
            self._insert_pending(s)
            done = s.execute(
                update(StoredFile)
                .where(StoredFile.id == self.file_id, StoredFile.status == "writing")
                .values(
                    bytes=self.bytes,
                    lines=lines,
                    sha256=sha256,
                    status="ready",
                    expires_at=self.upload.expires_at,
                    endpoint=endpoint,
                )
            )
            if not getattr(done, "rowcount", 0):  # the clean-up took it: it was too slow
                raise FileNotFoundError(f"{self.file_id}: removed while it was being written")
            row = s.get(StoredFile, self.file_id)
            assert row is not None
        self._open = False
        return row

    def abort(self) -> None:
        """Remove what was written; nothing of the file is left."""
        if not self._open:
            return
        self._open = False
        self._pending, self._buffer = [], bytearray()
        remove_rows(self.db, [self.file_id])


class _ChunkReader(io.RawIOBase):
    """The bytes of a file held in the store, fetched FETCH_CHUNKS at a time, in order."""

    def __init__(self, db: str, file_id: str, size: int):
        self.db, self.file_id, self.size = db, file_id, size
        self._chunks: deque[memoryview] = deque()
        self._next_seq = 0
        self._delivered = 0

    def readable(self) -> bool:
        return True

    def _fetch(self) -> bool:
        with session(self.db, readonly=True) as s:
            rows = s.execute(
                select(FileChunk.seq, FileChunk.data)
                .where(FileChunk.file_id == self.file_id, FileChunk.seq >= self._next_seq)
                .order_by(FileChunk.seq)
                .limit(FETCH_CHUNKS)
            ).all()
        for seq, data in rows:
            if seq != self._next_seq:
                break
            self._chunks.append(memoryview(data))
            self._next_seq += 1
        if not self._chunks and self._delivered < self.size:
            raise OSError(f"{self.file_id} was deleted while it was being read")
        return bool(self._chunks)

    def readinto(self, b: Any) -> int:
        while not self._chunks:
            if self._delivered >= self.size or not self._fetch():
                return 0
        chunk = self._chunks[0]
        n = min(len(b), len(chunk))
        b[:n] = chunk[:n]
        if n == len(chunk):
            self._chunks.popleft()
        else:
            self._chunks[0] = chunk[n:]
        self._delivered += n
        return n


def open_chunks(db: str, file_id: str, buffer_size: int = 1 << 16) -> io.BufferedReader:
    """The file's bytes as a buffered binary stream (`readline(n)` works): at most a few chunks
    in memory whatever the file's size. FileNotFoundError if there is no such file yet."""
    row = get_file(db, file_id)
    if row is None or row.path != store_path(file_id):
        raise FileNotFoundError(f"{store_path(file_id)}: no such file in the store")
    return io.BufferedReader(_ChunkReader(db, file_id, row.bytes), buffer_size)
