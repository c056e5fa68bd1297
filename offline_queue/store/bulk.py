"""Many rows per statement, at the driver: plain tuples with no per-row work above it, and an
insert as one statement of many rows rather than one per row, so that a settle's Python time
and its cost to a cluster's one PostgreSQL grow with chunks, not requests (SQLite: multi-row
VALUES; PostgreSQL: one array per column). (docs/ARCHITECTURE.md, Why the parts are as they are)
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, cast

from sqlalchemy import Connection
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ClauseElement

from offline_queue.store.tables import Base

MAX_PARAMETERS = 30_000
"""Bind parameters in one statement: under SQLite's 32,766 and PostgreSQL's 65,535."""


def _mark(conn: Connection) -> str:
    return "?" if conn.dialect.name == "sqlite" else "%s"


def insert_ignoring_conflicts(
    conn: Connection,
    table: type[Base],
    columns: Sequence[str],
    rows: Sequence[tuple[Any, ...]],
    returning: str | None = None,
) -> list[Any]:
    """INSERT … ON CONFLICT DO NOTHING of `rows` (tuples in `columns` order): a row whose key is
    there already (a replayed settle, two ingesters of one batch) is skipped, not an error.
    `returning`: a column whose values, of the rows inserted, are returned."""
    if not rows:
        return []
    head = f"INSERT INTO {table.__tablename__} ({', '.join(columns)}) "
    tail = " ON CONFLICT DO NOTHING" + (f" RETURNING {returning}" if returning else "")
    if conn.dialect.name == "postgresql":
        return _insert_arrays(conn, table, columns, rows, head, tail)
    inserted: list[Any] = []
    row_marks = "(" + ", ".join(["?"] * len(columns)) + ")"
    per_statement = max(1, MAX_PARAMETERS // len(columns))
    for start in range(0, len(rows), per_statement):
        part = rows[start : start + per_statement]
        done = conn.exec_driver_sql(
            head + "VALUES " + ", ".join([row_marks] * len(part)) + tail,
            tuple(value for row in part for value in row),
        )
        if returning:
            inserted += [row[0] for row in done]
    return inserted


ARRAY_ROWS = 10_000
"""Rows per statement on PostgreSQL, where a statement binds one array per column."""


def _insert_arrays(
    conn: Connection,
    table: type[Base],
    columns: Sequence[str],
    rows: Sequence[tuple[Any, ...]],
    head: str,
    tail: str,
) -> list[Any]:
    """PostgreSQL: the rows as one array per column, `SELECT * FROM unnest(…)`. A statement of
    as many placeholders as values is parsed for them, on the client (psycopg splits it with
    a regular expression, uncached past a length) and on the server, at every call. One
    placeholder per column keeps the text short and the same from call to call. An array
    holds one Python type (psycopg refuses 1 and 1.5 in one list): each value is made its
    column's type. Text goes as `text[]`, never `varchar(n)[]`: that cast would cut a value
    too long where the column's own check refuses it."""
    kinds = [table.__table__.c[name].type for name in columns]
    makes = [kind.python_type for kind in kinds]
    arrays = ", ".join(
        "%b::text[]" if make is str else f"%b::{kind.compile(dialect=conn.dialect)}[]"
        for kind, make in zip(kinds, makes, strict=True)
    )
    sql = head + f"SELECT * FROM unnest({arrays})" + tail
    inserted: list[Any] = []
    for start in range(0, len(rows), ARRAY_ROWS):
        part = rows[start : start + ARRAY_ROWS]
        arrays_of_part = tuple(
            [None if v is None else make(v) for v in column]
            for make, column in zip(makes, zip(*part, strict=True), strict=True)
        )
        # One parameter set in a list: a bare tuple of lists would read as many sets.
        done = conn.exec_driver_sql(sql, [arrays_of_part])
        if done.returns_rows:
            inserted += [row[0] for row in done]
    return inserted


# COPY's text format: backslash, newline, carriage return and tab are escaped, NULL is \N.
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"})
COPY_ROWS_PER_WRITE = 256
"""Rows per write to a COPY: psycopg's write_row costs twice the client time per row."""


def copy_text(value: str) -> str:
    """`value` as a field of COPY's text format."""
    # isprintable() is False for newline, CR and tab (and other characters, harmlessly).
    if "\\" in value or not value.isprintable():
        return value.translate(_COPY_ESCAPES)
    return value


def copy_lines(conn: Connection, sql: str, lines: Iterable[str]) -> None:
    """PostgreSQL: run `sql` (a COPY … FROM STDIN) in `conn`'s transaction, fed `lines` of
    COPY text (each ending in a newline), COPY_ROWS_PER_WRITE to a write."""
    driver: Any = conn.connection.driver_connection
    part: list[str] = []
    with driver.cursor() as cur, cur.copy(sql) as copy:
        for line in lines:
            part.append(line)
            if len(part) >= COPY_ROWS_PER_WRITE:
                copy.write("".join(part))
                part.clear()
        if part:
            copy.write("".join(part))


def copy_rows(
    conn: Connection, table: type[Base], columns: Sequence[str], rows: Sequence[tuple[Any, ...]]
) -> None:
    """PostgreSQL: COPY `rows` (str, int, float or None values) into `table`, in `conn`'s
    transaction. Unlike an insert, a row whose key is there fails the whole COPY."""
    sql = f"COPY {table.__tablename__} ({', '.join(columns)}) FROM STDIN"
    copy_lines(
        conn,
        sql,
        (
            "\t".join(
                "\\N" if v is None else copy_text(v) if type(v) is str else str(v) for v in row
            )
            + "\n"
            for row in rows
        ),
    )


def select_in(
    conn: Connection, sql: str, values: Sequence[Any], chunk: int = 4096
) -> list[tuple[Any, ...]]:
    """Rows of `sql`, whose one `{in}` stands for a list of `values`, in slices of `chunk`
    (SQLite caps the parameters of a statement)."""
    rows: list[tuple[Any, ...]] = []
    mark = _mark(conn)
    for start in range(0, len(values), chunk):
        part = list(values[start : start + chunk])
        found = conn.exec_driver_sql(sql.format(in_=", ".join([mark] * len(part))), tuple(part))
        rows += [tuple(row) for row in found]
    return rows


def _compiled(conn: Connection, stmt: ClauseElement) -> tuple[str, Any]:
    """SQL and parameters as the driver takes them."""
    compiled = cast(
        SQLCompiler,
        stmt.compile(dialect=conn.dialect, compile_kwargs={"render_postcompile": True}),
    )
    params: Any = compiled.params
    if compiled.positional:
        params = tuple(compiled.params[name] for name in compiled.positiontup or ())
    return str(compiled), params


def driver_rows(conn: Connection, stmt: ClauseElement) -> list[tuple[Any, ...]]:
    """Run a Core statement that returns many rows (a claim's or a settle's RETURNING) and
    fetch them at the driver: plain tuples instead of a Row object each, which was half the
    time of a claim of 8,192 requests. Bind values go to the driver as given (strings,
    numbers, None), so this is for statements whose parameters need no type processing."""
    sql, params = _compiled(conn, stmt)
    cursor = conn.connection.cursor()
    try:
        cursor.execute(sql, params)
        return cast(list[tuple[Any, ...]], cursor.fetchall())  # tuples from both drivers
    finally:
        cursor.close()


def driver_stream(
    conn: Connection, stmt: ClauseElement, size: int
) -> Iterator[list[tuple[Any, ...]]]:
    """`driver_rows` for results too large to hold: `size` rows at a time, from a server-side
    cursor on PostgreSQL (SQLite steps through its result lazily anyway)."""
    sql, params = _compiled(conn, stmt)
    if conn.dialect.name == "postgresql":
        raw: Any = conn.connection.driver_connection
        cursor = raw.cursor(name=f"stream_{os.urandom(6).hex()}")
    else:
        cursor = conn.connection.cursor()
    try:
        cursor.execute(sql, params)
        while rows := cursor.fetchmany(size):
            yield rows
    finally:
        cursor.close()
