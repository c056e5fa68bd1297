"""The `files` table: files uploaded through /v1/files. The bytes are on disk (written by
entrypoints/api/uploads.py before the row exists); the row says whose they are and where."""

from __future__ import annotations

import time

from offline_queue.store.db import session
from offline_queue.store.tables import StoredFile


def add_file(
    db: str,
    *,
    file_id: str,
    tenant: str,
    filename: str,
    purpose: str,
    size: int,
    lines: int,
    sha256: str,
    path: str,
) -> StoredFile:
    row = StoredFile(
        id=file_id,
        tenant=tenant,
        filename=filename,
        purpose=purpose,
        bytes=size,
        lines=lines,
        sha256=sha256,
        path=path,
        created_at=int(time.time()),
    )
    with session(db) as s:
        s.add(row)
    return row


def get_file(db: str, file_id: str) -> StoredFile | None:
    with session(db, readonly=True) as s:
        return s.get(StoredFile, file_id)
