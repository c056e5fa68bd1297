"""Files of the Files API: an upload streamed to where every node reads it — the store by default
(`store://<file id>`), or a `root` on a shared mount or object storage — checked against the
limits block by block, and deletion. An upload never sits in memory, an oversized one is refused
as soon as it breaks a limit, and nothing of a refused or broken upload is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from offline_queue.content import ContentHash
from offline_queue.storage import locate
from offline_queue.store import files
from offline_queue.store.files import STORE_SCHEME
from offline_queue.store.tables import StoredFile
from offline_queue.validate import Limits


class UploadRefused(ValueError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class UploadCheck:
    """The limits, the line count and the content hash of an upload, fed block by block."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.digest = ContentHash()
        self.size = self._lines = self._line_len = 0

    def feed(self, block: bytes) -> None:
        """Raises UploadRefused: 413 for size (file or line), 400 for too many lines."""
        limits = self.limits
        self.size += len(block)
        if self.size > limits.max_file_bytes:
            raise UploadRefused(413, f"file is over {limits.max_file_bytes} bytes (max_file_bytes)")
        start = 0
        while True:
            nl = block.find(b"\n", start)
            self._line_len += (nl if nl >= 0 else len(block)) - start
            if self._line_len > limits.max_line_bytes:
                raise UploadRefused(
                    413,
                    f"line {self._lines + 1} is over {limits.max_line_bytes} bytes "
                    "(max_line_bytes)",
                )
            if nl < 0:
                break
            self._lines += 1
            self._line_len = 0
            start = nl + 1
            if self._lines > limits.max_lines:
                raise UploadRefused(400, f"more than {limits.max_lines} lines (max_lines)")
        self.digest.update(block)

    def lines(self) -> int:
        """The line count, a last line without a newline included; refuses an empty file."""
        if self.size == 0:
            raise UploadRefused(400, "the file is empty")
        return self._lines + (1 if self._line_len else 0)


async def store_upload(
    blocks: AsyncIterator[bytes],
    limits: Limits,
    upload: files.Upload,
    *,
    db: str,
    root: str | None = None,
    endpoint: Callable[[], str | None] = lambda: None,
) -> StoredFile:
    """Stream the upload into the store (or under `root`), checking the limits on the way, and
    return the file's row: visible to readers only now that it is whole, and only within the
    tenant's quota (else store.files.StorageQuotaExceeded, nothing kept).
    `endpoint` tells, once the blocks are through, the url its request lines are for (the API's
    sniff of the stream). Writes run in a thread, so the event loop serves other requests while
    a block goes to the database."""
    check = UploadCheck(limits)
    if root is None:
        writer = await asyncio.to_thread(files.FileWriter, db, upload)
        try:
            async for block in blocks:
                check.feed(block)
                await asyncio.to_thread(writer.write, block)
            lines = check.lines()
            return await asyncio.to_thread(
                writer.commit, lines=lines, sha256=check.digest.hexdigest(), endpoint=endpoint()
            )
        except BaseException:
            await asyncio.to_thread(writer.abort)
            raise
    file_id = files.new_file_id()
    path = f"{root.rstrip('/')}/{file_id}.jsonl"
    with contextlib.ExitStack() as stack:
        # The place's writer is entered and left here, its blocks written in a thread: on an
        # exception the stack leaves it with the exception, which discards the partial file.
        out = stack.enter_context(locate(path, db).writing())
        async for block in blocks:
            check.feed(block)
            await asyncio.to_thread(out.write, block)
        lines = check.lines()
        await asyncio.to_thread(stack.close)  # the file appears whole (an upload completes)
    try:
        return await asyncio.to_thread(
            files.add_file,
            db,
            upload,
            file_id=file_id,
            path=path,
            size=check.size,
            lines=lines,
            sha256=check.digest.hexdigest(),
            endpoint=endpoint(),
        )
    except BaseException:  # no row points at the bytes: no orphan
        locate(path, db).remove()
        raise


def delete_file(db: str, file_id: str) -> bool:
    """Delete the file and its bytes wherever they are; whether there was one. Raises
    files.FileInUse while a batch still reads it (see `store.files.delete_file`)."""
    row = files.delete_file(db, file_id)
    if row is None:
        return False
    if not row.path.startswith(STORE_SCHEME):  # the store's chunks went with the row
        locate(row.path, db).remove()
    return True
