"""What validation finds: of a whole file (FileInfo, one pass's look), of a line (Accepted, what
is queued; Rejected, its error line). Plain data, so the store and the runs hold them without
importing validation."""

from __future__ import annotations

from dataclasses import dataclass

from offline_queue.batch_object import LineError


@dataclass(frozen=True)
class FileInfo:
    content_hash: str
    size: int
    lines: int
    named: tuple[tuple[str, str], ...] = ()
    """(url, model) of the accepted lines among the first PEEK_LINES, each pair once (MAX_NAMED
    at most), in file order: what the catalog routes the batch by (Catalog.batch_model), learnt
    in the same pass."""


@dataclass(slots=True)
class Accepted:
    line_no: int
    custom_id: str
    url: str
    body_json: str
    cache_digest: str | None
    """Digest of the canonical body when the request is deterministic, else None."""
    prefix_key: str = "-"
    """Sortable key grouping requests that share a rendered prefix (offline_queue/prefix.py)."""
    model: str = ""
    """The body's `model`, read from the dump validation already made (the catalog checks it)."""


@dataclass(slots=True)
class Rejected:
    line_no: int
    custom_id: str | None
    error: LineError
