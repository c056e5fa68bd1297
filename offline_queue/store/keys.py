"""The `api_keys` table: which tenant a key's hash belongs to, what the key may do, and whether
it was revoked. The key itself never reaches the store (offline_queue/api/auth.py makes and hashes
keys)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from sqlalchemy import bindparam, select, update

from offline_queue.store.db import one_read, session
from offline_queue.store.tables import ApiKey


@dataclass(frozen=True)
class KeyRights:
    """A live key's tenant and rights as stored; None where the server's default applies."""

    tenant: str
    tiers: tuple[str, ...] | None
    max_weight: int | None
    max_waiting: int | None
    max_stored_bytes: int | None


def add_key(db: str, key_hash: str, rights: KeyRights) -> None:
    tiers = ",".join(rights.tiers) if rights.tiers is not None else None
    with session(db) as s:
        s.add(
            ApiKey(
                key_hash=key_hash, created_at=int(time.time()), **asdict(rights) | {"tiers": tiers}
            )
        )


_LIVE_KEY = select(
    ApiKey.tenant, ApiKey.tiers, ApiKey.max_weight, ApiKey.max_waiting, ApiKey.max_stored_bytes
).where(ApiKey.key_hash == bindparam("key_hash"), ApiKey.revoked_at.is_(None))
"""Built once: every API call asks it (not cached in the API, so a revoked key stops at once),
and building an ORM lookup each time cost most of the call's CPU in SQLAlchemy."""


def rights_of(db: str, key_hash: str) -> KeyRights | None:
    """The rights of a key that exists and is not revoked, else None."""
    with one_read(db) as conn:
        row = conn.execute(_LIVE_KEY, {"key_hash": key_hash}).first()
    if row is None:
        return None
    tenant, tiers, max_weight, max_waiting, max_stored_bytes = row
    return KeyRights(
        tenant=tenant,
        tiers=tuple(t for t in tiers.split(",") if t) if tiers is not None else None,
        max_weight=max_weight,
        max_waiting=max_waiting,
        max_stored_bytes=max_stored_bytes,
    )


def list_keys(db: str, tenant: str | None = None) -> list[ApiKey]:
    """Every key (or a tenant's), oldest first, revoked ones included."""
    with session(db, readonly=True) as s:
        q = select(ApiKey).order_by(ApiKey.created_at, ApiKey.key_hash)
        if tenant is not None:
            q = q.where(ApiKey.tenant == tenant)
        return list(s.scalars(q))


def revoke_keys(db: str, hash_prefix: str) -> list[ApiKey]:
    """Revoke the live keys whose hash starts with `hash_prefix` (the id `keys list` shows);
    returns them. The caller refuses a prefix that names more than one key."""
    with session(db) as s:
        rows = list(
            s.scalars(
                select(ApiKey).where(
                    ApiKey.key_hash.startswith(hash_prefix, autoescape=True),
                    ApiKey.revoked_at.is_(None),
                )
            )
        )
        if len(rows) == 1:
            s.execute(
                update(ApiKey)
                .where(ApiKey.key_hash == rows[0].key_hash)
                .values(revoked_at=int(time.time()))
            )
        return rows
