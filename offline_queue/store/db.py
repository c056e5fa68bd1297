"""Connections: one SQLAlchemy engine per database URL per process, migrated on first use."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import platformdirs
from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from offline_queue.retry import RetryPolicy
from offline_queue.store import outbox  # noqa: F401  (registers the outbox: every ending writes its event)

log = logging.getLogger(__name__)

ENV_VAR = "OFFLINE_QUEUE_DB"
_MIGRATIONS = Path(__file__).with_name("migrations")
_PG_MIGRATION_LOCK = 0x0FF1_1E0E  # any constant: serialises concurrent `upgrade` runs


def default_url() -> str:
    """OFFLINE_QUEUE_DB, else a SQLite file under the user's data directory."""
    configured = os.environ.get(ENV_VAR)
    if configured:
        return configured
    data = Path(platformdirs.user_data_dir("offline-queue"))
    data.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{data / 'offline-queue.db'}"


def resolve_url(url: str | None) -> str:
    url = url or default_url()
    if url.startswith("postgresql://"):  # psycopg 3 is our driver; accept the plain scheme
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return url


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def _sqlite_hooks(engine: Engine) -> None:
    """SQLite has one writer: take the write lock at BEGIN (IMMEDIATE) so a claim's read and
    write are atomic, and wait for the lock instead of failing with "database is locked".

    (Writers in one process once queued on a Python lock before SQLite's: it did not pay — the
    ceiling ran 22,467 req/s with it and 23,687 without, median of three alternated runs.)"""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        # Checkpoint every ~40 MB of WAL instead of 4 MB: a queue rewrites the same index
        # pages chunk after chunk, and each checkpoint copies (and syncs) a page once however
        # often it changed. The cost: a WAL file of that size between checkpoints.
        cursor.execute("PRAGMA wal_autocheckpoint=10000")
        cursor.execute("PRAGMA busy_timeout=120000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        readonly = conn.get_execution_options().get("readonly", False)
        conn.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")


def _private_file(path: Path) -> None:
    """The SQLite store is created readable by this user only (0600; SQLite gives its -wal and
    -shm files the same mode) in a directory made 0700 if it is new: it holds every tenant's
    requests and answers."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))


@functools.cache
def get_engine(url: str) -> Engine:
    """The process's engine for `url`, with the schema migrated to head."""
    sa_url = make_url(url)
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if sa_url.get_backend_name() == "postgresql":
        # Connections open lazily, so a process that needs two holds two; one that serves many
        # callers at once (the API: 32 clients) keeps up to 20 open instead of opening and
        # closing one per transaction past the pool (a server process forked each time).
        kwargs.update(pool_size=20, max_overflow=20)
    if sa_url.get_backend_name() == "sqlite":
        if sa_url.database and sa_url.database != ":memory:":
            _private_file(Path(sa_url.database))
        kwargs["connect_args"] = {"timeout": 120, "check_same_thread": False}
    engine = create_engine(url, **kwargs)
    if is_sqlite(engine):
        _sqlite_hooks(engine)
    migrate(engine)
    return engine


@functools.cache
def session_factory(url: str) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url), expire_on_commit=False)


@contextlib.contextmanager
def session(url: str, readonly: bool = False) -> Iterator[Session]:
    """A transaction: committed on success, rolled back on error."""
    factory = session_factory(url)
    with factory() as s, s.begin():
        if readonly:  # before the first statement: the BEGIN hook reads it
            s.connection(execution_options={"readonly": True})
        yield s


@contextlib.contextmanager
def one_read(url: str) -> Iterator[Connection]:
    """A connection for a single read statement, outside a transaction: one round trip where a
    session's BEGIN, COMMIT and return to the pool make four (the API's key check, on every
    call)."""
    with get_engine(url).connect() as conn:
        if is_sqlite(conn.engine):  # no round trips to save; our BEGIN hook keeps the reins
            yield conn.execution_options(readonly=True)
        else:
            yield conn.execution_options(isolation_level="AUTOCOMMIT")


def migrate(engine: Engine) -> None:
    """Bring the schema to head. Safe when several processes start on a new database at once."""
    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    if is_sqlite(engine):
        lock_path = f"{engine.url.database}.migrate.lock"
        lock_fd = os.open(lock_path, os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(lock_fd, "w") as lock, engine.connect() as conn:
            fcntl.flock(lock, fcntl.LOCK_EX)
            config.attributes["connection"] = conn
            command.upgrade(config, "head")
            conn.commit()
        return
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
        conn.commit()
        try:
            config.attributes["connection"] = conn
            command.upgrade(config, "head")
            conn.commit()
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_MIGRATION_LOCK})
            conn.commit()


T = TypeVar("T")


def patiently(call: Callable[[], T], outage_seconds: float = 120.0) -> T:
    """`call()`, again with backoff while the store cannot be reached (a PostgreSQL restart or
    failover), for up to `outage_seconds`. For the reads a worker's loop makes between chunks:
    a chunk has Prefect's task retries, the loop around it has only this."""
    deadline = time.monotonic() + outage_seconds
    policy = RetryPolicy(base_seconds=0.5, cap_seconds=5.0)
    attempt = 0
    while True:
        try:
            return call()
        except (OperationalError, InterfaceError) as exc:
            if time.monotonic() > deadline:
                raise
            attempt += 1
            log.warning("store unreachable (%s); retrying", type(exc).__name__)
            time.sleep(policy.delay(attempt))
