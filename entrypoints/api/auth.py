"""API keys: each maps to one tenant. Only a hash is stored; the key is shown once."""

from __future__ import annotations

import hashlib
import secrets

from offline_queue.store import keys


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(db: str, tenant: str) -> str:
    key = f"oq-{secrets.token_urlsafe(32)}"
    keys.add_key(db, _digest(key), tenant)
    return key


def tenant_for_key(db: str, key: str) -> str | None:
    return keys.tenant_of(db, _digest(key))
