"""The store's clock: the one time that workers on different machines compare.

A lease that one node writes and another judges, a retry's `not_before`, an engine share's
heartbeat, a batch's `expires_at`: each is stamped and compared in the statement that reads or
writes it, with the database's clock, so a node whose own clock runs ahead neither takes
chunks that are still leased nor drops a batch before its window ends. Being part of the
statement, it costs no round trip.

PostgreSQL: `statement_timestamp()`, one value for the whole statement (every row a claim takes
gets the same lease; `now()` would be the transaction's start, `clock_timestamp()` changes from
row to row). SQLite is one machine, so its clock is every worker's clock; `julianday('now')`
keeps it one code path (SQLite 3.40 has no `unixepoch('subsec')`), at millisecond resolution.
The values stay epoch seconds, as the columns always held.
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
