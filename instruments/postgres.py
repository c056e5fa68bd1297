"""A PostgreSQL cluster of our own on loopback, for tests and benchmarks."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from instruments.loopback import free_port
from instruments.nodes import shared_dir
from instruments.processes import children, wait_for


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
    """A throw-away cluster: data in a temporary directory, TCP on a free loopback port, and
    its Unix socket in a directory that simulated nodes see (instruments.nodes), so a node
    with a network namespace of its own still reaches it. It can be stopped, SIGKILLed (the
    postmaster and every backend) and started again in place: same data, same port."""

    root: Path
    socket_dir: Path
    port: int
    settings: tuple[str, ...] = ()
    """Extra `-c name=value` server settings (a benchmark's `shared_preload_libraries`, say)."""

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def url(self) -> str:
        """Base URL over TCP, no database: append `/name`."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}"

    def socket_url(self, database: str) -> str:
        """`database` through the Unix socket: what a node in its own network namespace uses."""
        return f"postgresql+psycopg://postgres@/{database}?host={self.socket_dir}&port={self.port}"

    def init(self) -> None:
        subprocess.run(
            as_postgres([pg_bin("initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres"]),
            check=True,
            capture_output=True,
        )

    def start(self, timeout: float = 60) -> None:
        """pg_ctl start, retried: right after a SIGKILL the old shared memory may still be
        attached for a moment, and PostgreSQL refuses to start until it is gone."""
        options = (
            f"-p {self.port} -k {self.socket_dir} -c listen_addresses=127.0.0.1 "
            "-c max_connections=200 -c fsync=off"
        ) + "".join(f" -c {setting}" for setting in self.settings)
        cmd = [pg_bin("pg_ctl"), "-D", str(self.data), "-o", options]
        deadline = time.monotonic() + timeout
        while True:
            done = subprocess.run(
                as_postgres([*cmd, "-l", str(self.root / "log"), "-w", "start"]),
                capture_output=True,
                text=True,
            )
            if done.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"pg_ctl start failed: {done.stdout}{done.stderr}")
            time.sleep(0.5)

    def stop(self, mode: str = "immediate") -> None:
        subprocess.run(
            as_postgres([pg_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "stop"]),
            capture_output=True,
        )

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def kill(self) -> bool:
        """SIGKILL the postmaster and every backend at once (the server dies, as in an OOM
        kill of the whole service); True when it was running. `start()` brings it back."""
        pid = self.postmaster_pid()
        if pid is None or not Path(f"/proc/{pid}").exists():
            return False
        victims = (pid, *children(pid))
        for p in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: not any(Path(f"/proc/{p}").exists() for p in victims), 10)
        return True

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
def postgres(*settings: str) -> Iterator[Postgres]:
    """initdb + start (fsync off: these databases are thrown away), stopped and removed after;
    `settings` are extra `name=value` server settings (later ones win)."""
    root = Path(tempfile.mkdtemp(prefix="oq-pg-"))
    pg = Postgres(root, shared_dir("oq-pg-"), free_port(), settings)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(pg.socket_dir, "postgres")
    try:
        pg.init()
        pg.start()
        yield pg
    finally:
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(pg.socket_dir, ignore_errors=True)
