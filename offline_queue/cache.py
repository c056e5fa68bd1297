"""The result cache: answers to deterministic requests, by model version and canonical body,
shared by every batch on the store. Its entries point at `results` rows and are written behind
the settles (`ResultCache.flush`), in one statement per flush, as a hashed key per entry costs a
settle more than the rest of it. (docs/ARCHITECTURE.md, Why the parts are as they are)
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import orjson
from sqlalchemy.exc import InterfaceError, OperationalError

from offline_queue.engines.base import Reply
from offline_queue.formats import CHAT_URL, COMPLETIONS_URL, RESPONSES_URL
from offline_queue.store import cache as cache_rows

log = logging.getLogger(__name__)


_FRESH = {
    CHAT_URL: ("chatcmpl-", "created"),
    COMPLETIONS_URL: ("cmpl-", "created"),
    RESPONSES_URL: ("resp_", "created_at"),
}
"""Per endpoint: the id prefix and the time field a cached answer gets anew."""


def version_tag(model_version: str) -> str:
    return hashlib.sha256(model_version.encode()).hexdigest()[:16]


@dataclass(slots=True)
class Entry:
    body: str
    prompt_tokens: int
    completion_tokens: int

    def reply(self, url: str) -> Reply:
        """The cached answer under a fresh id and time: a new response with the same content."""
        body = orjson.loads(self.body)
        fresh = _FRESH.get(url)
        if fresh is not None:  # an embeddings list has neither id nor time
            prefix, stamp = fresh
            body["id"] = f"{prefix}{os.urandom(16).hex()}"
            body[stamp] = time.time() if url == RESPONSES_URL else int(time.time())
        return Reply(
            ok=True,
            body=orjson.dumps(body).decode(),
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            latency_ms=0.0,
            finished_at=time.time(),
        )


class ResultCache:
    """One worker's view of the cache for one model version."""

    def __init__(
        self,
        db: str,
        model_version: str,
        flush_entries: int = 1_000_000,
        flush_seconds: float = 30.0,
    ):
        self.db = db
        self.model_version = model_version
        self.flush_entries = flush_entries
        """Answers held before a write. More means fewer writes — once the cache is large, a
        write rewrites most pages of its key index whatever its size; a held answer costs a
        line number in memory (~40 bytes; the entry points at its `results` row).
        Only an engine answering thousands a second reaches it before `flush_seconds`."""
        self.flush_seconds = flush_seconds
        """At most this long before an answer is visible to other workers and batches (and to
        later chunks of the same batch)."""
        self._tag = version_tag(model_version)
        self._pending: dict[str, list[int]] = {}
        self._count = 0
        self._lock = threading.Lock()
        self._next_flush = time.monotonic() + flush_seconds

    def key(self, digest: str) -> str:
        """The version's tag (64 bits) in place of the first 16 hex digits of the request's
        digest (192 bits left): no hashing per request, and no two versions share a key.
        The store's fill statement builds the same key in SQL."""
        return self._tag + digest[16:]

    def lookup(self, keys: Iterable[str]) -> dict[str, Entry]:
        wanted = sorted(set(keys))
        if not wanted:
            return {}
        return {k: Entry(b, p, c) for k, b, p, c in cache_rows.lookup(self.db, wanted)}

    def remember(self, batch_id: str, line_nos: Sequence[int]) -> None:
        """Note lines whose fresh answers are committed (deterministic ones); they are copied
        into the cache at the next flush that is due."""
        with self._lock:
            self._pending.setdefault(batch_id, []).extend(line_nos)
            self._count += len(line_nos)
            due = self._count >= self.flush_entries or time.monotonic() >= self._next_flush
        if due:
            self.flush()

    def flush(self) -> int:
        """Point the cache at the noted answers in `results`, one statement per batch, sorted
        by key (neighbouring keys share index pages): no answer passes through Python or is
        copied."""
        with self._lock:
            pending, self._pending, self._count = self._pending, {}, 0
            self._next_flush = time.monotonic() + self.flush_seconds
        try:
            return cache_rows.fill(self.db, self._tag, self.model_version, pending)
        except (OperationalError, InterfaceError) as exc:  # the store is restarting
            log.warning("result cache: answers of %d batches not written (%s)", len(pending), exc)
            return 0
