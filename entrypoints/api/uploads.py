"""Uploaded batch files: streamed to disk in blocks, checked against the limits on the way, so a
200 MB upload never sits in memory and an oversized one is refused before it is kept."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from offline_queue.content import ContentHash
from offline_queue.validate import Limits


class UploadRefused(ValueError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Stored:
    file_id: str
    path: Path
    bytes: int
    lines: int
    sha256: str
    """The content hash (offline_queue/content.py): what a worker computes from the same file,
    whatever its line ends."""


async def store_upload(chunks: AsyncIterator[bytes], directory: Path, limits: Limits) -> Stored:
    """Write the upload to `directory` block by block; refuse (and delete) it as soon as it
    breaks a limit: 413 for size (file or line), 400 for too many lines."""
    directory.mkdir(parents=True, exist_ok=True)
    file_id = f"file-{uuid.uuid4().hex[:24]}"
    final = directory / f"{file_id}.jsonl"
    partial = directory / f".{file_id}.part"
    digest = ContentHash()
    size = lines = line_len = 0
    try:
        with partial.open("wb") as out:
            async for chunk in chunks:
                size += len(chunk)
                if size > limits.max_file_bytes:
                    raise UploadRefused(
                        413, f"file is over {limits.max_file_bytes} bytes (max_file_bytes)"
                    )
                start = 0
                while True:
                    nl = chunk.find(b"\n", start)
                    piece = (nl if nl >= 0 else len(chunk)) - start
                    line_len += piece
                    if line_len > limits.max_line_bytes:
                        raise UploadRefused(
                            413,
                            f"line {lines + 1} is over {limits.max_line_bytes} bytes "
                            "(max_line_bytes)",
                        )
                    if nl < 0:
                        break
                    lines += 1
                    line_len = 0
                    start = nl + 1
                    if lines > limits.max_lines:
                        raise UploadRefused(400, f"more than {limits.max_lines} lines (max_lines)")
                digest.update(chunk)
                out.write(chunk)
        if line_len:
            lines += 1
        if size == 0:
            raise UploadRefused(400, "the file is empty")
        os.replace(partial, final)
    finally:
        partial.unlink(missing_ok=True)
    return Stored(file_id, final, size, lines, digest.hexdigest())
