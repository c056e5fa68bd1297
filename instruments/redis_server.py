"""A Redis server of our own on loopback (Debian's `redis-server`), for tests and benchmarks:
no persistence, a free port, stopped with its context."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from instruments.loopback import free_port
from instruments.processes import stop, wait_for


def redis_installed() -> bool:
    return shutil.which("redis-server") is not None


@contextmanager
def redis_server() -> Iterator[str]:
    """Yields the server's redis:// URL once it answers PING."""
    import redis

    port = free_port()
    with tempfile.TemporaryDirectory(prefix="oq-redis-") as work:
        proc = subprocess.Popen(
            [
                "redis-server",
                "--bind",
                "127.0.0.1",
                "--port",
                str(port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                work,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"redis://127.0.0.1:{port}/0"
        client = redis.Redis.from_url(url)

        def answers() -> bool:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        try:
            wait_for(answers, timeout=30)
            yield url
        finally:
            client.close()
            stop(proc)
