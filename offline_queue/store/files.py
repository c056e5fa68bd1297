"""The `files` table: files uploaded through /v1/files. The bytes are on disk (written by
entrypoints/api/uploads.py before the row exists); the row says whose they are and where."""

from __future__ import annotations

import time

from sqlalchemy import func, select, text

from offline_queue.store.db import session
from offline_queue.store.tables import StoredFile


class StorageQuotaExceeded(Exception):
    """The tenant's files would hold more bytes than its key allows: the API's 413."""

    def __init__(self, stored: int, limit: int):
        super().__init__(
            f"your files hold {stored} bytes; with this one they would pass your quota of "
            f"{limit} bytes (max_stored_bytes)"
        )


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
    endpoint: str | None = None,
    max_stored_bytes: int | None = None,
) -> StoredFile:
    """The file's row; with `max_stored_bytes`, only while the tenant's files stay within it
    (one check per tenant at a time on PostgreSQL; SQLite has one writer anyway)."""
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
        endpoint=endpoint,
    )
    with session(db) as s:
        if max_stored_bytes is not None:
            if s.get_bind().dialect.name == "postgresql":
                s.execute(
                    text("SELECT pg_advisory_xact_lock(hashtext(:t))"), {"t": f"files:{tenant}"}
                )
            stored = int(
                s.scalar(
                    select(func.coalesce(func.sum(StoredFile.bytes), 0)).where(
                        StoredFile.tenant == tenant
                    )
                )
                or 0
            )
            if stored + size > max_stored_bytes:
                raise StorageQuotaExceeded(stored, max_stored_bytes)
        s.add(row)
    return row


def get_file(db: str, file_id: str) -> StoredFile | None:
    with session(db, readonly=True) as s:
        return s.get(StoredFile, file_id)
