"""Real services on loopback for tests and benchmarks: a PostgreSQL cluster of our own and a
`prefect server start`. Instruments, not product: nothing under offline_queue/ imports this."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx

BIN = Path(sys.executable).parent
T = TypeVar("T")


def exit_on_sigterm() -> None:
    """SIGTERM (a `kill`, a CI timeout) unwinds like Ctrl-C: the services' `finally` blocks
    run, so no PostgreSQL, Prefect or vLLM server is left behind."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], T], timeout: float, interval: float = 0.2) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout} s")
        time.sleep(interval)


def pg_bin(name: str) -> str:
    for candidate in (shutil.which(name), f"/usr/lib/postgresql/15/bin/{name}"):
        if candidate and os.path.exists(candidate):
            return candidate
    raise RuntimeError(f"PostgreSQL's {name} is not installed")


def as_postgres(cmd: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root: run it as the `postgres` user when we are root.
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@dataclass
class Postgres:
    """A PostgreSQL cluster in a temporary directory, on a free loopback port."""

    root: Path
    port: int

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def url(self) -> str:
        """Base URL, no database: append `/name`."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}"

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.root / 'sock'} -c listen_addresses=127.0.0.1 "
            "-c max_connections=200 -c fsync=off"
        )
        cmd = [pg_bin("pg_ctl"), "-D", str(self.data), "-o", options]
        subprocess.run(
            as_postgres([*cmd, "-l", str(self.root / "log"), "-w", "start"]),
            check=True,
            capture_output=True,
        )

    def stop(self, mode: str = "immediate") -> None:
        subprocess.run(
            as_postgres([pg_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "stop"]),
            capture_output=True,
        )

    def postmaster_pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def create_database(self, name: str) -> str:
        return create_database(self.url, name)


def create_database(server_url: str, name: str) -> str:
    """A fresh database on the server at `server_url` (dropped first if it exists); its URL."""
    import psycopg

    plain = server_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(f"{plain}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{server_url}/{name}"


@contextlib.contextmanager
def postgres() -> Iterator[Postgres]:
    """initdb + start (fsync off: these databases are thrown away), stopped and removed after."""
    root = Path(tempfile.mkdtemp(prefix="oq-pg-"))
    (root / "sock").mkdir()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(root / "sock", "postgres")
    pg = Postgres(root, free_port())
    subprocess.run(
        as_postgres([pg_bin("initdb"), "-D", str(pg.data), "-A", "trust", "-U", "postgres"]),
        check=True,
        capture_output=True,
    )
    pg.start()
    try:
        yield pg
    finally:
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)


def healthy(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@contextlib.contextmanager
def prefect_server(
    home: Path, database_url: str | None = None, ui: bool = False, **settings: str
) -> Iterator[dict[str, str]]:
    """`prefect server start` with its own PREFECT_HOME (SQLite there, or `database_url`, a
    PostgreSQL URL); yields the environment that points Prefect clients at it."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="true" if ui else "false",
        PREFECT_UI_API_URL=api,  # else the UI calls port 4200 and shows "Oops"
        **settings,
    )
    if database_url:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url.replace("+psycopg", "+asyncpg")
    with (home / "server.log").open("wb") as log:
        server = subprocess.Popen(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=home,
        )
        try:
            wait_for(
                lambda: server.poll() is not None or healthy(f"{api}/health"),
                timeout=180,
                interval=0.5,
            )
            if server.poll() is not None:
                raise RuntimeError((home / "server.log").read_text()[-2000:])
            env["PREFECT_API_URL"] = api
            yield env
        finally:
            server.terminate()
            server.wait(30)
