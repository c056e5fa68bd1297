"""The `result_cache` table: entries that point at the `results` row holding an answer, by
key (model version's tag + canonical body digest, see offline_queue/cache.py). Looked up per
chunk; written behind, in bulk, by a statement that copies nothing but keys and row
pointers.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import orjson
from sqlalchemy import text

from offline_queue.store.bulk import select_in
from offline_queue.store.db import get_engine

CachedAnswer = tuple[str, str, int, int]
"""(key, body, prompt_tokens, completion_tokens) of a cached answer."""


def lookup(db: str, keys: Sequence[str]) -> list[CachedAnswer]:
    """The cached answers among `keys`, read through to their `results` rows."""
    with get_engine(db).connect() as conn:
        conn.execution_options(readonly=True)  # SQLite: a plain BEGIN, not the writer's
        rows = select_in(
            conn,
            "SELECT c.key, s.body, s.prompt_tokens, s.completion_tokens "
            "FROM result_cache c JOIN results s "
            "ON s.batch_id = c.batch_id AND s.line_no = c.line_no WHERE c.key IN ({in_})",
            keys,
        )
    return [(k, b, p, c) for k, b, p, c in rows]


def fill(db: str, tag: str, model_version: str, lines: Mapping[str, list[int]]) -> int:
    """Entries for the answers of `lines` (line numbers by batch) under the version's `tag`,
    one statement per batch (`_FILL`), in one transaction; returns how many were added. A key
    already there is kept."""
    written = 0
    with get_engine(db).begin() as conn:
        sqlite = conn.dialect.name == "sqlite"
        for batch_id, line_nos in lines.items():
            result = conn.execute(
                text(_FILL.format(lines=_SQLITE_LINES if sqlite else _PG_LINES)),
                {
                    "tag": tag,
                    "version": model_version,
                    "now": time.time(),
                    "batch": batch_id,
                    "lines": orjson.dumps(line_nos).decode() if sqlite else line_nos,
                },
            )
            written += int(result.rowcount or 0)
    return written


# The cache rows for some lines of a batch: ok, fresh (not themselves from the cache) answers
# of deterministic requests. The key is the version's tag in place of the first 16 hex digits
# of the request's digest, as ResultCache.key builds it.
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
