"""API keys: each maps to one tenant and carries what it may do. Only a hash is stored; the key
is shown once."""

from __future__ import annotations

import hashlib
import re
import secrets

from offline_queue.states import MAX_WEIGHT, Tier
from offline_queue.store import keys
from offline_queue.store.keys import KeyRights

TENANT = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}\Z")
"""What a tenant name may be: it is shown in logs and tags, and stored in 128 characters."""


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(
    db: str,
    tenant: str,
    *,
    tiers: tuple[str, ...] | None = None,
    max_weight: int | None = None,
    max_waiting: int | None = None,
    max_stored_bytes: int | None = None,
) -> str:
    """A new key for `tenant` with these rights (None: the server's defaults)."""
    if not TENANT.match(tenant):
        raise ValueError("a tenant is 1-128 of A-Z a-z 0-9 . _ : @ -, starting with a letter/digit")
    if tiers is not None and (not tiers or not set(tiers) <= set(Tier)):
        raise ValueError(f"tiers: some of {', '.join(Tier)}")
    if max_weight is not None and not 1 <= max_weight <= MAX_WEIGHT:
        raise ValueError(f"max_weight: 1 to {MAX_WEIGHT}")
    for name, value in (("max_waiting", max_waiting), ("max_stored_bytes", max_stored_bytes)):
        if value is not None and not 0 <= value < 1 << 62:
            raise ValueError(f"{name}: a size of at least 0")
    key = f"oq-{secrets.token_urlsafe(32)}"
    rights = KeyRights(tenant, tiers, max_weight, max_waiting, max_stored_bytes)
    keys.add_key(db, digest(key), rights)
    return key


def rights_for_key(db: str, key: str) -> KeyRights | None:
    """The rights of a live key; None for an unknown or revoked one."""
    return keys.rights_of(db, digest(key))
