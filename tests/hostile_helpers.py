"""The hostile-tenant harness the test_hostile_* files share: one API per store (the module-scoped
`hostile` fixture) with small limits, tenants with keys of their own, raw HTTP for what httpx will
not send, a table of bad inputs and the checks every answer and every module end must pass."""

from __future__ import annotations

import json
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy import select

from instruments.postgres import create_database
from instruments.processes import wait_for
from offline_queue.states import Tier
from offline_queue.store.db import session
from offline_queue.store.tables import Batch
from offline_queue.validate import Limits
from tests.api_helpers import Api, serve_api
from tests.test_pipeline import line

MARK = "ECHO-MARK-7f3a"
"""Put into bad inputs: no error body may contain it (errors never echo the input)."""
MAX_FILE = 200_000
MAX_JSON = 64 << 10
STANDARD = 60  # requests waiting in the standard tier before a tenant past its share is refused


@dataclass
class Hostile:
    api: Api
    access_log: Path
    data_dir: Path
    db_file: Path | None

    @property
    def root(self) -> str:
        return self.api.url.removesuffix("/v1")

    @property
    def port(self) -> int:
        return int(self.root.rsplit(":", 1)[1])

    def tenant(self, **rights: Any) -> Tenant:
        name = f"t-{uuid.uuid4().hex[:10]}"
        return Tenant(self, name, self.api.key(name, **rights))


@dataclass
class Tenant:
    h: Hostile
    name: str
    key: str
    _file: str | None = field(default=None)

    def http(self, **headers: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.h.api.url,
            headers={"Authorization": f"Bearer {self.key}", **headers},
            timeout=60,
        )

    def sdk(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.h.api.url, api_key=self.key, max_retries=0)

    def upload(self, body: bytes, name: str = "in.jsonl") -> httpx.Response:
        with self.http() as c:
            return c.post("/files", files={"file": (name, body)}, data={"purpose": "batch"})

    def file_id(self, lines: int = 1, url: str = "/v1/chat/completions") -> str:
        if self._file is None or lines != 1 or url != "/v1/chat/completions":
            body = jsonl([line(f"r{i}", url=url, max_tokens=1) for i in range(lines)])
            r = self.upload(body)
            assert r.status_code == 200, r.text
            if lines != 1 or url != "/v1/chat/completions":
                return str(r.json()["id"])
            self._file = str(r.json()["id"])
        return self._file

    def create(self, **body: Any) -> httpx.Response:
        headers = body.pop("headers", {})
        body.setdefault("endpoint", "/v1/chat/completions")
        body.setdefault("completion_window", "24h")
        if "input_file_id" not in body:
            body["input_file_id"] = self.file_id()
        with self.http(**headers) as c:
            return c.post("/batches", json=body)

    def batch_id(self) -> str:
        r = self.create()
        assert r.status_code == 200, r.text
        return str(r.json()["id"])


def jsonl(items: list[Any]) -> bytes:
    return "".join(json.dumps(x) + "\n" for x in items).encode()


@pytest.fixture(name="hostile", scope="module", params=["sqlite", "pg"])
def hostile_api(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    vllm_server: str,
) -> Iterator[Hostile]:
    """`hostile`: one API per store for the module's cases (each case uses tenants of its own),
    on the session's served engine; small limits so the cases stay small. A module imports it
    (each module gets its own pair) and ends with `no_batch_left_running`."""
    from offline_queue.api.settings import ApiSettings

    root = tmp_path_factory.mktemp(f"hostile-{request.param}")
    db_file = None
    if request.param == "sqlite":
        db_file = root / "store" / "store.db"
        db = f"sqlite:///{db_file}"
    else:
        db = create_database(request.getfixturevalue("pg_server"), f"h_{uuid.uuid4().hex[:12]}")
    settings = ApiSettings(
        db=db,
        data_dir=root / "api",
        engine=vllm_server,
        chunk_size=8,
        limits=Limits(max_line_bytes=4096, max_lines=300, max_file_bytes=MAX_FILE),
        max_queued={Tier.CRITICAL: 100, Tier.STANDARD: STANDARD, Tier.BULK: 1000},
        max_json_bytes=MAX_JSON,
        access_log=root / "access.log",
    )
    with serve_api(settings) as api:
        yield Hostile(api, root / "access.log", root / "api", db_file)


# --- raw HTTP, for what httpx will not send -------------------------------------------------


def raw(h: Hostile, head: str, body: bytes = b"", read_all: bool = True) -> tuple[int, bytes]:
    """Send `head` (request line and headers, without the blank line) and `body` as given."""
    with socket.create_connection(("127.0.0.1", h.port), timeout=30) as s:
        s.sendall(head.replace("\n", "\r\n").encode("latin-1") + b"\r\n\r\n" + body)
        data = b""
        while b"\r\n\r\n" not in data or (read_all and not _complete(data)):
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            data += chunk
    status = int(data.split(b" ", 2)[1]) if data else 0
    return status, data.partition(b"\r\n\r\n")[2]


def _complete(data: bytes) -> bool:
    head, _, body = data.partition(b"\r\n\r\n")
    for header in head.split(b"\r\n"):
        if header.lower().startswith(b"content-length:"):
            return len(body) >= int(header.split(b":", 1)[1])
    return False


def multipart(parts: list[tuple[bytes, bytes]], boundary: bytes = b"XyZbound") -> bytes:
    """A multipart body from (headers, content) pairs, byte for byte as given."""
    out = b""
    for headers, content in parts:
        out += b"--" + boundary + b"\r\n" + headers + b"\r\n\r\n" + content + b"\r\n"
    return out + b"--" + boundary + b"--\r\n"


FILE_HEAD = b'Content-Disposition: form-data; name="file"; filename="a.jsonl"'
PURPOSE = (b'Content-Disposition: form-data; name="purpose"', b"batch")


def post_form(t: Tenant, body: bytes, boundary: bytes = b"XyZbound") -> tuple[int, bytes]:
    head = (
        f"POST /v1/files HTTP/1.1\nHost: x\nAuthorization: Bearer {t.key}\n"
        f"Content-Type: multipart/form-data; boundary={boundary.decode()}\n"
        f"Content-Length: {len(body)}\nConnection: close"
    )
    return raw(t.h, head, body)


def good_line() -> bytes:
    return json.dumps(line("a", max_tokens=1)).encode() + b"\n"


# --- the cases --------------------------------------------------------------------------------

Result = httpx.Response | tuple[int, bytes]
Case = Callable[[Tenant], Result]


class Cases(dict[str, tuple[set[int], Case]]):
    """A file's table of bad inputs: by name, the statuses it may be answered with and how to
    send it (as a fresh tenant)."""

    def add(self, name: str, statuses: set[int], send: Case) -> None:
        assert name not in self, name
        self[name] = (statuses, send)


def refused_in_openais_shape(result: Result, statuses: set[int]) -> None:
    """A bad input's answer: one of `statuses`, an OpenAI error body, never the input echoed."""
    status, body = (
        (result.status_code, result.content) if isinstance(result, httpx.Response) else result
    )
    assert status in statuses, (status, body[:300])
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"] and error["code"]
    assert MARK.encode() not in body and len(body) < 2000, body[:300]


def no_batch_left_running(h: Hostile) -> None:
    """After every case of a module: every batch of this store ends (the cases cancelled theirs)."""

    def running() -> list[str]:
        with session(h.api.db) as s:
            return list(
                s.scalars(
                    select(Batch.id).where(
                        Batch.status.not_in(["completed", "failed", "cancelled", "expired"])
                    )
                )
            )

    for bid in running():  # those a case left, cancelled from the store's side
        from offline_queue.store import batches

        batches.request_cancel(h.api.db, bid)
    wait_for(lambda: not running(), timeout=300, interval=1)
    wait_for(  # and their run threads are over
        lambda: not [t for t in threading.enumerate() if t.name.startswith("run-batch_")],
        timeout=120,
        interval=0.5,
    )
