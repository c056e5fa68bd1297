"""The store's clock: the one time that workers on different machines compare. Leases, retry
times, heartbeats and expiry are stamped and compared in the statement that reads or writes
them, on the database's clock, so a node whose own clock runs ahead neither takes a leased chunk
nor drops a batch early, at no extra round trip.
(docs/ARCHITECTURE.md, Why the parts are as they are)
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import BigInteger, Float, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.functions import FunctionElement

_PG_EPOCH = "EXTRACT(EPOCH FROM statement_timestamp())"
_SQLITE_EPOCH = "((julianday('now') - 2440587.5) * 86400.0)"


class now(FunctionElement[float]):
    """The store's time in epoch seconds, as a float: leases, retry times, heartbeats."""

    type = Float()
    inherit_cache = True


class now_seconds(FunctionElement[int]):
    """The store's time in whole epoch seconds: the stamps OpenAI shows as integers."""

    type = BigInteger()
    inherit_cache = True


@compiles(now, "postgresql")
def _pg_now(_element: now, _compiler: Any, **_kw: Any) -> str:
    return f"CAST({_PG_EPOCH} AS DOUBLE PRECISION)"


@compiles(now, "sqlite")
def _sqlite_now(_element: now, _compiler: Any, **_kw: Any) -> str:
    return _SQLITE_EPOCH


@compiles(now_seconds, "postgresql")
def _pg_seconds(_element: now_seconds, _compiler: Any, **_kw: Any) -> str:
    return f"CAST(FLOOR({_PG_EPOCH}) AS BIGINT)"


@compiles(now_seconds, "sqlite")
def _sqlite_seconds(_element: now_seconds, _compiler: Any, **_kw: Any) -> str:
    return f"CAST({_SQLITE_EPOCH} AS INTEGER)"  # positive: CAST truncates, as floor would


def seconds(s: Session) -> int:
    """The store's time in whole seconds, read in `s`'s transaction: for a row built in Python
    (a new batch, whose `expires_at` every worker will judge)."""
    return int(s.execute(select(now_seconds())).scalar_one())
