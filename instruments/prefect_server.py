"""A `prefect server start` of our own on loopback, for tests and benchmarks."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from instruments.loopback import free_port, healthy
from instruments.processes import BIN, serving


@contextlib.contextmanager
def prefect_server(
    home: Path,
    database_url: str | None = None,
    ui: bool = False,
    *,
    timeout: float = 180,
    **settings: str,
) -> Iterator[dict[str, str]]:
    """`prefect server start` with its own PREFECT_HOME (SQLite there, or `database_url`, a
    PostgreSQL URL); yields the environment that points Prefect clients at it.

    In a session of its own, stopped as a process group: `prefect server start` runs the API
    in a uvicorn child that outlives a SIGTERM to it alone (one was left behind, its parent
    gone, after a test session), and a driver that kills other process groups (the fault
    schedule) must not take the server with them."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ)
    for inherited in ("PREFECT_API_URL", "PREFECT_API_DATABASE_CONNECTION_URL"):
        env.pop(inherited, None)
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="true" if ui else "false",
        PREFECT_UI_API_URL=api,  # else the UI calls port 4200 and shows "Oops"
        **settings,
    )
    if database_url:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url.replace("+psycopg", "+asyncpg")
    cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with serving(
        cmd,
        lambda: healthy(f"{api}/health"),
        home / "server.log",
        timeout=timeout,
        interval=0.5,
        env=env,
        cwd=home,
        start_new_session=True,
    ):
        env["PREFECT_API_URL"] = api
        yield env
