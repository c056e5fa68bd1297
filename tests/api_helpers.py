"""The HTTP API as the tests drive it: the app under uvicorn on loopback, API keys, and the
`openai` SDK calls the tests share (upload, wait for a terminal status, read a file's lines)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import openai
import uvicorn

from instruments.loopback import free_port
from instruments.processes import wait_for

if TYPE_CHECKING:
    from offline_queue.api.settings import ApiSettings

ALL_TIERS = ("critical", "standard", "bulk")


class Api:
    def __init__(self, url: str, db: str, metrics: str | None = None):
        self.url, self.db = url, db
        self.metrics = metrics
        """The metrics listener's /metrics URL, when the settings asked for one."""

    def key(self, tenant: str, **rights: Any) -> str:
        """A key for `tenant`; every tier unless `rights` says otherwise."""
        from offline_queue.api.auth import create_key

        rights.setdefault("tiers", ALL_TIERS)
        return create_key(self.db, tenant, **rights)

    def client(self, tenant: str, **rights: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key=self.key(tenant, **rights), max_retries=0)


@contextmanager
def serve_api(settings: ApiSettings) -> Iterator[Api]:
    """`offline-queue api`'s app with `settings` under uvicorn on a free loopback port."""
    from offline_queue.api.app import create_app

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, timeout=30)
    try:
        port_m = settings.metrics_port
        metrics = f"http://127.0.0.1:{port_m}/metrics" if port_m else None
        yield Api(f"http://127.0.0.1:{port}/v1", settings.db, metrics)
    finally:
        server.should_exit = True
        thread.join(10)


def upload(client: openai.OpenAI, path: Path) -> Any:
    with path.open("rb") as f:
        return client.files.create(file=f, purpose="batch")


def wait_terminal(client: openai.OpenAI, batch_id: str, timeout: float = 300) -> Any:
    return wait_for(
        lambda: (
            (b := client.batches.retrieve(batch_id)).status
            in ("completed", "failed", "cancelled", "expired")
            and b
        ),
        timeout=timeout,
        interval=0.5,
    )


def lines_of(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    assert file_id
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()]
