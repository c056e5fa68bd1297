"""The `api_keys` table: which tenant a key's hash belongs to. The key itself never reaches
the store (entrypoints/api/auth.py makes and hashes keys)."""

from __future__ import annotations

import time

from offline_queue.store.db import session
from offline_queue.store.tables import ApiKey


def add_key(db: str, key_hash: str, tenant: str) -> None:
    with session(db) as s:
        s.add(ApiKey(key_hash=key_hash, tenant=tenant, created_at=int(time.time())))


def tenant_of(db: str, key_hash: str) -> str | None:
    with session(db, readonly=True) as s:
        row = s.get(ApiKey, key_hash)
        return row.tenant if row else None
