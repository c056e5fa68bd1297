"""The clean-up: what has expired goes, and it says what went. A finished batch past
`output_expires_at` loses its written files and its result rows' content (with the cache entries
pointing at it), not the rows: the batch object still tells what it did, and a download answers
that the outputs expired (batches.OutputsRemoved). Uploads past `expires_at`, or never finished,
go whole, except a file a batch is still reading, which waits for a later clean-up.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from offline_queue.batches import virtual_outputs
from offline_queue.storage import StorageUnavailable, locate
from offline_queue.store import expiry, files
from offline_queue.store.files import STORE_SCHEME

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Removed:
    batches: int
    """Batches whose outputs were removed."""
    result_rows: int
    """Result rows whose content was cleared."""
    output_files: int
    """Output and error files deleted where they were written."""
    files: int
    """Uploaded files deleted (expired, or never finished)."""


def _remove(db: str, where: str) -> bool:
    try:
        return locate(where, db).remove()
    except (OSError, StorageUnavailable) as exc:  # gone already, or unreachable: say so
        log.warning("could not remove %s: %s", where, exc)
        return False


def remove_expired(db: str) -> Removed:
    """Remove everything that has expired by the database's clock; the counts, also logged."""
    batch_count = rows = output_files = 0
    for batch_id, output, errors in expiry.expired_outputs(db):
        for where, virtual in zip((output, errors), virtual_outputs(batch_id), strict=True):
            if where != virtual and _remove(db, where):
                output_files += 1
        rows += expiry.remove_outputs(db, batch_id)
        batch_count += 1
    expired = expiry.expired_files(db)
    for _, where in expired:
        if not where.startswith(STORE_SCHEME):
            _remove(db, where)
    file_count = files.remove_rows(db, [file_id for file_id, _ in expired])
    removed = Removed(batch_count, rows, output_files, file_count)
    log.info(
        "clean-up: outputs of %d batches removed (%d result rows cleared, %d files deleted); "
        "%d uploaded files deleted",
        removed.batches,
        removed.result_rows,
        removed.output_files,
        removed.files,
    )
    return removed
