"""The result cache: answers to deterministic requests, by model version and canonical body,
shared by every batch on the store.

Written behind, not with each chunk: a key is a hash, so every entry lands on a random page of
the index, and on a fast engine writing them inside each settle cost more than the rest of the
settle (bench/ceiling.py: ~17 µs of SQLite work per request at 1,000,000 entries). Entries of
committed answers are held in memory and written in key order — every `flush_entries` entries,
every `flush_seconds`, and when the worker stops. Crash-safe by construction: the cache is
never the record of a result (`results` is), so an entry lost with a killed worker is only
an answer the next identical request computes again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

import orjson
from sqlalchemy.exc import InterfaceError, OperationalError

from offline_queue.engines.base import Reply
from offline_queue.formats import CHAT_URL
from offline_queue.store.bulk import insert_ignoring_conflicts, select_in
from offline_queue.store.db import get_engine
from offline_queue.store.tables import CachedResult

log = logging.getLogger(__name__)

_COLUMNS = ("key", "model_version", "body", "prompt_tokens", "completion_tokens", "created_at")


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
        body["id"] = f"{'chatcmpl' if url == CHAT_URL else 'cmpl'}-{os.urandom(16).hex()}"
        body["created"] = int(time.time())
        return Reply(
            ok=True,
            body=orjson.dumps(body).decode(),
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            latency_ms=0.0,
            finished_at=time.time(),
        )


class ResultCache:
    """One worker's view of the cache for one model version: look-ups see the store and what
    this worker has not written yet."""

    def __init__(
        self,
        db: str,
        model_version: str,
        flush_entries: int = 200_000,
        flush_seconds: float = 30.0,
    ):
        self.db = db
        self.model_version = model_version
        self.flush_entries = flush_entries
        """Entries held before a write: more means fewer writes — a flush rewrites most pages
        of the key index once the cache is large, whatever its size — and more memory (~0.5 KB
        an entry: 200,000 is ~100 MB, reached only by engines answering thousands a second)."""
        self.flush_seconds = flush_seconds
        """At most this long before a held entry is visible to other workers and batches."""
        self._tag = version_tag(model_version)
        self._pending: dict[str, Entry] = {}
        self._lock = threading.Lock()
        self._next_flush = time.monotonic() + flush_seconds

    def key(self, digest: str) -> str:
        """The version's tag (64 bits) in place of the first 16 hex digits of the request's
        digest (192 bits left): no hashing per request, and no two versions share a key."""
        return self._tag + digest[16:]

    def lookup(self, keys: Iterable[str]) -> dict[str, Entry]:
        wanted = set(keys)
        with self._lock:
            found = {k: self._pending[k] for k in wanted if k in self._pending}
        rest = sorted(wanted - found.keys())
        if rest:
            with get_engine(self.db).connect() as conn:
                conn.execution_options(readonly=True)  # SQLite: a plain BEGIN, not the writer's
                rows = select_in(
                    conn,
                    "SELECT key, body, prompt_tokens, completion_tokens FROM result_cache "
                    "WHERE key IN ({in_})",
                    rest,
                )
            found.update({k: Entry(b, p, c) for k, b, p, c in rows})
        return found

    def remember(self, entries: Iterable[tuple[str, Entry]]) -> None:
        """Hold answers whose results are committed; written at the next flush that is due."""
        with self._lock:
            self._pending.update(entries)
            due = len(self._pending) >= self.flush_entries or time.monotonic() >= self._next_flush
        if due:
            self.flush()

    def flush(self) -> int:
        """Write what is held, in key order (neighbouring keys share index pages)."""
        with self._lock:
            pending, self._pending = self._pending, {}
            self._next_flush = time.monotonic() + self.flush_seconds
        if not pending:
            return 0
        now = time.time()
        rows = [
            (k, self.model_version, e.body, e.prompt_tokens, e.completion_tokens, now)
            for k, e in sorted(pending.items())
        ]
        try:
            with get_engine(self.db).begin() as conn:
                insert_ignoring_conflicts(conn, CachedResult, _COLUMNS, rows)
        except (OperationalError, InterfaceError) as exc:  # the store is restarting
            log.warning("result cache: %d entries not written (%s)", len(rows), exc)
            return 0
        return len(rows)
