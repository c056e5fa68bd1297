"""The result cache: answers to deterministic requests, by model version and canonical body,
shared by every batch on the store.

Written behind, not with each chunk: a key is a hash, so every entry lands on a random page of
the index, and on a fast engine writing them inside each settle cost more than the rest of the
settle (bench/ceiling.py: ~17 µs of SQLite work per request at 1,000,000 entries). A worker
notes the lines whose answers it committed, and every `flush_entries` answers, every
`flush_seconds` and when it stops, the store adds entries pointing at those `results` rows, in
key order, in one statement. Crash-safe by construction: the cache is never the record of a
result (`results` is), so answers a killed worker had not pointed to yet are only answers
the next identical request computes again.
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
from sqlalchemy import text
from sqlalchemy.exc import InterfaceError, OperationalError

from offline_queue.engines.base import Reply
from offline_queue.formats import CHAT_URL
from offline_queue.store.bulk import select_in
from offline_queue.store.db import get_engine

log = logging.getLogger(__name__)


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
        `_FILL` builds the same key in SQL."""
        return self._tag + digest[16:]

    def lookup(self, keys: Iterable[str]) -> dict[str, Entry]:
        wanted = sorted(set(keys))
        if not wanted:
            return {}
        with get_engine(self.db).connect() as conn:
            conn.execution_options(readonly=True)  # SQLite: a plain BEGIN, not the writer's
            rows = select_in(
                conn,
                "SELECT c.key, s.body, s.prompt_tokens, s.completion_tokens "
                "FROM result_cache c JOIN results s "
                "ON s.batch_id = c.batch_id AND s.line_no = c.line_no WHERE c.key IN ({in_})",
                wanted,
            )
        return {k: Entry(b, p, c) for k, b, p, c in rows}

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
        written = 0
        try:
            with get_engine(self.db).begin() as conn:
                sqlite = conn.dialect.name == "sqlite"
                for batch_id, lines in pending.items():
                    result = conn.execute(
                        text(_FILL.format(lines=_SQLITE_LINES if sqlite else _PG_LINES)),
                        {
                            "tag": self._tag,
                            "version": self.model_version,
                            "now": time.time(),
                            "batch": batch_id,
                            "lines": orjson.dumps(lines).decode() if sqlite else lines,
                        },
                    )
                    written += int(result.rowcount or 0)
        except (OperationalError, InterfaceError) as exc:  # the store is restarting
            log.warning("result cache: answers of %d batches not written (%s)", len(pending), exc)
            return 0
        return written


# The cache rows for some lines of a batch: ok, fresh (not themselves from the cache) answers
# of deterministic requests.
_FILL = """
INSERT INTO result_cache (key, model_version, batch_id, line_no, created_at)
SELECT :tag || substr(q.cache_digest, 17), :version, s.batch_id, s.line_no, :now
FROM results s JOIN requests q ON q.batch_id = s.batch_id AND q.line_no = s.line_no
WHERE s.batch_id = :batch AND s.line_no {lines}
  AND s.ok AND NOT s.reused AND q.cache_digest IS NOT NULL
ORDER BY 1
ON CONFLICT DO NOTHING
"""
_SQLITE_LINES = "IN (SELECT value FROM json_each(:lines))"
_PG_LINES = "= ANY(:lines)"
