"""API keys: each maps to one tenant. Only a hash is stored; the key is shown once."""

from __future__ import annotations

import hashlib
import secrets
import time

from offline_queue.store.db import session
from offline_queue.store.tables import ApiKey


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(db: str, tenant: str) -> str:
    key = f"oq-{secrets.token_urlsafe(32)}"
    with session(db) as s:
        s.add(ApiKey(key_hash=_digest(key), tenant=tenant, created_at=int(time.time())))
    return key


def tenant_for_key(db: str, key: str) -> str | None:
    with session(db, readonly=True) as s:
        row = s.get(ApiKey, _digest(key))
        return row.tenant if row else None
