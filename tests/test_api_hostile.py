"""The API against careless and hostile tenants, over real HTTP on loopback, on SQLite and on
PostgreSQL: every bad input of CASES (auth, uploads, batch create, pagination, ids) is answered
4xx in OpenAI's shape without echoing the input and without a 500; then the properties no input
may break: fair admission, idempotency per tenant, isolation, the access log, file modes, keys
that can be revoked, and no batch left running.

One room over 400 lines on purpose: CASES is one table of hostile inputs run against one pair
of API servers (its fixtures), and the closing test checks that none of them left a batch
running; split by topic, each file would start its own servers and lose that last check."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import socket
import stat
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy import delete, select

from instruments.postgres import create_database
from instruments.processes import wait_for
from offline_queue.files import store_upload
from offline_queue.states import Tier
from offline_queue.store.db import session
from offline_queue.store.files import Upload
from offline_queue.store.tables import Batch
from offline_queue.validate import Limits
from tests.api_helpers import Api, serve_api
from tests.conftest import cli_env, run_cli
from tests.test_pipeline import line

pytestmark = pytest.mark.usefixtures("prefect_api")

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


@pytest.fixture(scope="module", params=["sqlite", "pg"])
def hostile(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    vllm_server: str,
) -> Iterator[Hostile]:
    """One API per store for the module's cases (each case uses tenants of its own), on the
    session's served engine; small limits so the cases stay small."""
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
CASES: dict[str, tuple[set[int], Case]] = {}


def case(name: str, *statuses: int) -> Callable[[Case], Case]:
    def register(fn: Case) -> Case:
        assert name not in CASES, name
        CASES[name] = (set(statuses), fn)
        return fn

    return register


def simple(name: str, statuses: set[int], fn: Case) -> None:
    assert name not in CASES, name
    CASES[name] = (statuses, fn)


def anon(t: Tenant, **headers: str) -> httpx.Client:
    return httpx.Client(base_url=t.h.api.url, headers=headers, timeout=30)


def _anon_get(headers: dict[str, str]) -> Case:
    return lambda t: anon(t, **headers).get("/batches")


def _post_json(content: bytes) -> Case:
    return lambda t: t.http().post(
        "/batches", content=content, headers={"Content-Type": "application/json"}
    )


def _create_with(**body: Any) -> Case:
    return lambda t: t.create(**body)


def _get(path: str, **params: str) -> Case:
    return lambda t: t.http().get(path, params=params)


# Auth: every path needs a live key, and nothing is read before it is checked.
for _name, _headers in {
    "auth-none": {},
    "auth-basic": {"Authorization": "Basic dXNlcjpwYXNz"},
    "auth-unknown-key": {"Authorization": f"Bearer oq-{MARK}"},
    "auth-no-scheme": {"Authorization": "oq-abc"},
    "auth-10kb-key": {"Authorization": "Bearer " + "k" * 10_000},
    "auth-sql-key": {"Authorization": "Bearer ' OR '1'='1"},
    "auth-key-with-spaces": {"Authorization": "Bearer a b c"},
}.items():
    simple(
        _name,
        {401},
        _anon_get(_headers),
    )
simple(
    "auth-latin1-key",
    {401},
    lambda t: raw(
        t.h,
        "GET /v1/batches HTTP/1.1\nHost: x\nAuthorization: Bearer \xe9\xe8\xff\nConnection: close",
    ),
)
simple(
    "auth-empty-bearer",
    {401},
    lambda t: raw(
        t.h, "GET /v1/batches HTTP/1.1\nHost: x\nAuthorization: Bearer \nConnection: close"
    ),
)
simple("auth-other-path", {401}, lambda t: anon(t).get("/files/file-abc"))
simple("auth-unknown-path", {401}, lambda t: anon(t).get("/nothing/here"))
simple("auth-docs", {401}, lambda t: httpx.get(t.h.root + "/docs"))
simple("auth-openapi", {401}, lambda t: httpx.get(t.h.root + "/openapi.json"))
simple("health-post-needs-a-key", {401}, lambda t: httpx.post(t.h.root + "/health"))
simple("auth-redoc", {401}, lambda t: httpx.get(t.h.root + "/redoc"))
simple(
    "auth-upload-before-body",
    {401},
    lambda t: raw(
        t.h,
        "POST /v1/files HTTP/1.1\nHost: x\nContent-Type: multipart/form-data; boundary=b\n"
        f"Content-Length: {5 << 30}\nConnection: close",
        b"--b\r\n",
    ),
)
simple(
    "auth-json-before-body",
    {401},
    lambda t: raw(
        t.h,
        "POST /v1/batches HTTP/1.1\nHost: x\nContent-Type: application/json\n"
        f"Content-Length: {80 << 20}\nConnection: close",
        b"{",
    ),
)
simple(
    "auth-revoked-key",
    {401},
    lambda t: _revoked_get(t),
)


def _revoked_get(t: Tenant) -> httpx.Response:
    from offline_queue.api.auth import digest
    from offline_queue.store import keys

    assert len(keys.revoke_keys(t.h.api.db, digest(t.key))) == 1
    return t.http().get("/batches")


# Routing, in OpenAI's shape too.
simple("route-unknown", {404}, lambda t: t.http().get("/nothing"))
simple("route-docs-off", {404}, lambda t: t.http().get(t.h.root + "/docs"))
simple("route-openapi-off", {404}, lambda t: t.http().get(t.h.root + "/openapi.json"))
simple("route-delete-batches", {405}, lambda t: t.http().delete("/batches"))
simple("route-put-files", {405}, lambda t: t.http().put("/files", content=b"x"))
simple("route-get-cancel", {405}, lambda t: t.http().get(f"/batches/{t.batch_id()}/cancel"))

# Uploads.
simple("upload-empty-file", {400}, lambda t: t.upload(b""))
simple("upload-blank-lines", {400}, lambda t: t.upload(b"\n" * 50_000))
simple("upload-blank-crlf", {400}, lambda t: t.upload(b"\r\n  \t\r\n" * 1000))
simple("upload-gzip", {400}, lambda t: t.upload(gzip.compress(good_line() * 20)))
simple("upload-binary", {400}, lambda t: t.upload(bytes(range(256)).replace(b"\n", b"") * 10))
simple(
    "upload-binary-lines",
    {400},
    lambda t: t.upload((os.urandom(100).replace(b"\n", b"") + b"\n") * 200),
)
simple("upload-png", {400}, lambda t: t.upload(b"\x89PNG\r\n\x1a\n" + b"\x00" * 2000))
simple("upload-csv", {400}, lambda t: t.upload(b"a,b,c\n1,2,3\n" * 100))
simple("upload-nul-lines", {400}, lambda t: t.upload(b"\x00\x00\x00\n" * 150))
simple("upload-long-line", {413}, lambda t: t.upload(b'{"x": "' + b"y" * 5000 + b'"}\n'))
simple("upload-too-many-lines", {400}, lambda t: t.upload(good_line() * 301))
simple("upload-too-big", {413}, lambda t: t.upload((b'{"a": 1}' + b" " * 1000 + b"\n") * 250))
simple(
    "upload-chunked-too-big",
    {413},
    lambda t: t.http().post(
        "/files",
        content=iter([b"--b\r\n" + FILE_HEAD + b"\r\n\r\n"] + [b"{}" + b" " * 4000 + b"\n"] * 80),
        headers={"Content-Type": "multipart/form-data; boundary=b"},
    ),
)
simple(
    "upload-declared-5gib",
    {413},
    lambda t: raw(
        t.h,
        f"POST /v1/files HTTP/1.1\nHost: x\nAuthorization: Bearer {t.key}\n"
        f"Content-Type: multipart/form-data; boundary=b\nContent-Length: {5 << 30}\n"
        "Connection: close",
        b"--b\r\n",
    ),
)
simple(
    "upload-no-purpose",
    {400},
    lambda t: t.http().post("/files", files={"file": ("a.jsonl", good_line())}),
)
simple(
    "upload-purpose-fine-tune",
    {400},
    lambda t: t.http().post(
        "/files", files={"file": ("a.jsonl", good_line())}, data={"purpose": "fine-tune"}
    ),
)
simple(
    "upload-purpose-huge",
    {400},
    lambda t: t.http().post(
        "/files", files={"file": ("a.jsonl", good_line())}, data={"purpose": MARK * 500}
    ),
)
simple(
    "upload-no-file-part",
    {400},
    lambda t: t.http().post(
        "/files", data={"purpose": "batch"}, files={"other": ("a.jsonl", good_line())}
    ),
)
simple(
    "upload-two-files",
    {400},
    lambda t: post_form(t, multipart([PURPOSE, (FILE_HEAD, good_line()), (FILE_HEAD, b"{}")])),
)
simple("upload-json-body", {400}, lambda t: t.http().post("/files", json={"purpose": "batch"}))
simple(
    "upload-no-boundary",
    {400},
    lambda t: t.http().post(
        "/files", content=good_line(), headers={"Content-Type": "multipart/form-data"}
    ),
)
simple(
    "upload-garbage-multipart",
    {400},
    lambda t: post_form(t, b"this is not multipart at all " + MARK.encode()),
)
simple(
    "upload-truncated-multipart",
    {400},
    lambda t: post_form(t, multipart([PURPOSE, (FILE_HEAD, good_line())])[:-20]),
)
simple(
    "upload-filename-nul",
    {400},
    lambda t: post_form(
        t,
        multipart(
            [
                PURPOSE,
                (
                    b'Content-Disposition: form-data; name="file"; filename="a\x00.jsonl"',
                    good_line(),
                ),
            ]
        ),
    ),
)
simple(
    "upload-filename-300",
    {400},
    lambda t: t.http().post(
        "/files", files={"file": ("f" * 300, good_line())}, data={"purpose": "batch"}
    ),
)
simple(
    "upload-filename-not-utf8",
    {400},
    lambda t: post_form(
        t,
        multipart(
            [
                PURPOSE,
                (
                    b'Content-Disposition: form-data; name="file"; filename="\xff\xfe.jsonl"',
                    good_line(),
                ),
            ]
        ),
    ),
)
simple(
    "upload-filename-control",
    {400},
    lambda t: post_form(
        t,
        multipart(
            [
                PURPOSE,
                (
                    b'Content-Disposition: form-data; name="file"; filename="a\x07\x1b[31m"',
                    good_line(),
                ),
            ]
        ),
    ),
)
simple(
    "upload-too-many-parts",
    {400},
    lambda t: post_form(
        t,
        multipart([PURPOSE] + [(b'Content-Disposition: form-data; name="purpose"', b"batch")] * 9),
    ),
)
simple(
    "upload-unknown-field",
    {400},
    lambda t: post_form(
        t,
        multipart(
            [(b'Content-Disposition: form-data; name="evil"', b"1"), (FILE_HEAD, good_line())]
        ),
    ),
)
simple(
    "upload-purpose-not-utf8",
    {400},
    lambda t: post_form(t, multipart([(PURPOSE[0], b"\xff\xfe"), (FILE_HEAD, good_line())])),
)
simple(
    "upload-over-stored-quota",
    {413},
    lambda t: t.h.tenant(max_stored_bytes=100).upload(good_line()),
)

# Batch create: the body.
for _name, _content in {
    "create-not-json": b"not json " + MARK.encode(),
    "create-json-array": b"[1, 2, 3]",
    "create-json-null": b"null",
    "create-json-string": b'"' + MARK.encode() + b'"',
    "create-empty-object": b"{}",
    "create-nan": b'{"input_file_id": NaN, "endpoint": "/v1/chat/completions"}',
    "create-infinity": b'{"input_file_id": "file-a", "endpoint": Infinity}',
    "create-huge-int": b'{"input_file_id": ' + b"9" * 5000 + b', "endpoint": "x"}',
    "create-deep-nesting": b'{"metadata": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    "create-truncated-json": b'{"input_file_id": "file-',
    "create-invalid-utf8": b'{"input_file_id": "\xff\xfe", "endpoint": "/v1/chat/completions"}',
    "create-over-json-cap": b'{"metadata": {"a": "' + b"x" * (MAX_JSON + 10) + b'"}}',
}.items():
    simple(
        _name,
        {400, 413},
        _post_json(_content),
    )
simple(
    "create-declared-5gib",
    {413},
    lambda t: raw(
        t.h,
        f"POST /v1/batches HTTP/1.1\nHost: x\nAuthorization: Bearer {t.key}\n"
        f"Content-Type: application/json\nContent-Length: {5 << 30}\nConnection: close",
        b"{",
    ),
)
simple(
    "create-text-plain",
    {400},
    lambda t: t.http().post("/batches", content=b"hello", headers={"Content-Type": "text/plain"}),
)
simple("create-missing-file-id", {400}, lambda t: t.create(input_file_id=None))
simple("create-file-id-int", {400}, lambda t: t.create(input_file_id=12345))
simple("create-file-id-nul", {404}, lambda t: t.create(input_file_id="file-\x00abc"))
simple("create-file-id-10kb", {400}, lambda t: t.create(input_file_id="file-" + MARK * 1000))
simple("create-file-id-unknown", {404}, lambda t: t.create(input_file_id="file-000000000000"))
simple("create-file-id-path", {404}, lambda t: t.create(input_file_id="../../etc/passwd"))
simple("create-file-id-sql", {404}, lambda t: t.create(input_file_id="file-' OR 1=1 --"))
simple(
    "create-file-id-of-other-tenant",
    {404},
    lambda t: t.create(input_file_id=t.h.tenant().file_id()),
)
simple(
    "create-file-id-an-output", {404}, lambda t: t.create(input_file_id=f"{t.batch_id()}-output")
)
simple("create-unknown-field", {400}, lambda t: t.create(evil=MARK))
simple(
    "create-endpoint-embeddings-for-a-chat-file",
    {400},
    lambda t: t.create(endpoint="/v1/embeddings"),
)
simple("create-endpoint-moderations", {400}, lambda t: t.create(endpoint="/v1/moderations"))
simple("create-endpoint-nul", {400}, lambda t: t.create(endpoint="/v1/chat/completions\x00"))
simple("create-endpoint-long", {400}, lambda t: t.create(endpoint="/v1/" + MARK * 100))
simple("create-endpoint-int", {400}, lambda t: t.create(endpoint=7))
simple(
    "create-endpoint-mismatch-chat-as-completions",
    {400},
    lambda t: t.create(endpoint="/v1/completions"),
)
simple(
    "create-endpoint-mismatch-completions-as-chat",
    {400},
    lambda t: t.create(input_file_id=t.file_id(2, url="/v1/completions")),
)
for _window in [
    "0s",
    "24h\n",
    "\u0662\u0664h",
    "999999999999999d",
    "8d",
    "604801s",
    "24",
    "h",
    "-1h",
    "1.5h",
    " 24h",
    "",
    "24H",
    "1w",
    "0024h",
    "24h24h",
    "\uff12\uff14h",
    MARK,
]:
    simple(
        f"create-window-{_window.encode('unicode_escape').decode()!s}",
        {400},
        _create_with(completion_window=_window),
    )
simple("create-window-int", {400}, lambda t: t.create(completion_window=24))
simple("create-window-null", {400}, lambda t: t.create(completion_window=None))
simple("create-metadata-list", {400}, lambda t: t.create(metadata=["a"]))
simple(
    "create-metadata-17-keys", {400}, lambda t: t.create(metadata={f"k{i}": "v" for i in range(17)})
)
simple("create-metadata-key-65", {400}, lambda t: t.create(metadata={"k" * 65: "v"}))
simple("create-metadata-empty-key", {400}, lambda t: t.create(metadata={"": "v"}))
simple("create-metadata-value-513", {400}, lambda t: t.create(metadata={"k": MARK * 40}))
simple("create-metadata-value-int", {400}, lambda t: t.create(metadata={"k": 1}))
simple("create-metadata-value-null", {400}, lambda t: t.create(metadata={"k": None}))
simple("create-metadata-nested", {400}, lambda t: t.create(metadata={"k": {"a": "b"}}))
simple("create-metadata-nul", {400}, lambda t: t.create(metadata={"k": "a\x00b"}))
simple("create-metadata-20mb", {413}, lambda t: t.create(metadata={"k": "x" * (20 << 20)}))
simple("create-tier-gold", {400}, lambda t: t.create(metadata={"tier": "gold"}))
simple("create-tier-nul", {400}, lambda t: t.create(metadata={"tier": "critical\x00"}))
simple("create-tier-upper", {400}, lambda t: t.create(metadata={"tier": "CRITICAL"}))
simple(
    "create-tier-not-allowed",
    {403},
    lambda t: t.h.tenant(tiers=("standard",)).create(metadata={"tier": "critical"}),
)
simple(
    "create-tier-default-key-critical",
    {403},
    lambda t: t.h.tenant(tiers=None).create(metadata={"tier": "critical"}),
)
for _weight in [
    "0",
    "-1",
    "-5",
    "1.5",
    "abc",
    "99999999999999999999",
    "9223372036854775808",
    "2147483648",
    "1e3",
    "\u0661",
    " 1",
    "01",
    "1001",
    "",
]:
    simple(
        f"create-weight-{_weight or 'empty'}",
        {400},
        _create_with(metadata={"weight": _weight}),
    )
simple(
    "create-weight-over-key-cap",
    {403},
    lambda t: t.h.tenant(max_weight=3).create(metadata={"weight": "4"}),
)
simple(
    "create-idempotency-key-300",
    {400},
    lambda t: t.create(headers={"Idempotency-Key": "k" * 300}),
)
simple(
    "create-idempotency-key-spaces",
    {400},
    lambda t: t.create(headers={"Idempotency-Key": "a b"}),
)
simple(
    "create-idempotency-key-latin1",
    {400},
    lambda t: raw(
        t.h,
        f"POST /v1/batches HTTP/1.1\nHost: x\nAuthorization: Bearer {t.key}\n"
        "Idempotency-Key: \xe9t\xe9\nContent-Type: application/json\nContent-Length: 2\n"
        "Connection: close",
        b"{}",
    ),
)
simple("create-idempotency-reuse-other-metadata", {409}, lambda t: _reuse(t, metadata={"x": "y"}))
simple("create-idempotency-reuse-other-window", {409}, lambda t: _reuse(t, completion_window="1h"))
simple(
    "create-idempotency-reuse-other-file",
    {409},
    lambda t: _reuse(t, input_file_id=t.file_id(2)),
)
simple("create-over-waiting-quota", {429}, lambda t: _quota(t))
simple(
    "create-more-than-the-tier-takes",
    {429},
    lambda t: t.create(input_file_id=t.file_id(STANDARD + 1)),
)


def _reuse(t: Tenant, **change: Any) -> httpx.Response:
    key = f"k-{uuid.uuid4().hex}"
    first = t.create(headers={"Idempotency-Key": key})
    assert first.status_code == 200, first.text
    again = t.create(headers={"Idempotency-Key": key}, **change)
    t.http().post(f"/batches/{first.json()['id']}/cancel")
    return again


def _quota(t: Tenant) -> httpx.Response:
    small = t.h.tenant(max_waiting=1)
    return small.create(input_file_id=small.file_id(2))


# Pagination and ids in paths.
for _limit in ["0", "-1", "101", "1" + "0" * 30, "abc", "1.5", "", "NaN"]:
    simple(
        f"list-limit-{_limit or 'empty'}",
        {400},
        _get("/batches", limit=_limit),
    )
for _name, _after in {
    "list-after-nul": "batch_\x00",
    "list-after-10kb": "batch_" + MARK * 1000,
    "list-after-file-id": "file-abc",
    "list-after-sql": "batch_' OR 1=1",
    "list-after-unicode": "batch_\u0663\u0663",
}.items():
    simple(_name, {400}, _get("/batches", after=_after))
for _name, _path in {
    "get-batch-nul": "/batches/batch_%00x",
    "get-batch-10kb": "/batches/batch_" + "a" * 10_000,
    "get-batch-unknown": "/batches/batch_0000000000",
    "get-batch-not-an-id": "/batches/" + MARK,
    "get-file-traversal": "/files/..%2F..%2Fetc%2Fpasswd",
    "get-file-nul": "/files/file-%00",
    "get-file-unknown": "/files/file-000000",
    "get-content-unknown": "/files/file-000000/content",
    "get-content-output-unknown": "/files/batch_000000-output/content",
    "get-content-traversal": "/files/..%2F..%2Fstore.db/content",
}.items():
    simple(_name, {404}, _get(_path))
simple("cancel-unknown", {404}, lambda t: t.http().post("/batches/batch_000000/cancel"))
simple("cancel-not-an-id", {404}, lambda t: t.http().post("/batches/%00/cancel"))


def _other_tenants(method: str, path: str, kind: str) -> Case:
    """`path` with the id of a `kind` (batch, file) of another tenant: a 404, as if unknown."""
    return lambda t: t.http().request(method, path.format(getattr(t.h.tenant(), f"{kind}_id")()))


for _name, _method, _path, _kind in [
    ("get-other-tenants-batch", "GET", "/batches/{}", "batch"),
    ("cancel-other-tenants-batch", "POST", "/batches/{}/cancel", "batch"),
    ("get-other-tenants-file", "GET", "/files/{}", "file"),
    ("get-other-tenants-file-content", "GET", "/files/{}/content", "file"),
    ("get-other-tenants-output", "GET", "/files/{}-errors/content", "batch"),
]:
    simple(_name, {404}, _other_tenants(_method, _path, _kind))
simple(
    "get-own-output-not-ready",
    {404},
    lambda t: t.http().get(f"/files/{t.batch_id()}-output/content"),
)


def _flood(t: Tenant) -> Result:
    """Twenty bad requests at once from one tenant: each still answered on its own."""
    bodies = [b"{", b"[]", b'{"input_file_id": NaN}', b"null"] * 5
    out: list[httpx.Response] = []
    lock = threading.Lock()

    def send(body: bytes) -> None:
        r = t.http().post("/batches", content=body, headers={"Content-Type": "application/json"})
        with lock:
            out.append(r)

    threads = [threading.Thread(target=send, args=(b,)) for b in bodies]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert len(out) == 20 and all(r.status_code == 400 for r in out), [r.status_code for r in out]
    return out[0]


simple("concurrent-bad-creates", {400}, _flood)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(hostile: Hostile, name: str) -> None:
    statuses, send = CASES[name]
    result = send(hostile.tenant())
    status, body = (
        (result.status_code, result.content) if isinstance(result, httpx.Response) else result
    )
    assert status in statuses, (status, body[:300])
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"] and error["code"]
    assert MARK.encode() not in body and len(body) < 2000, body[:300]


def test_the_case_count() -> None:
    print(f"{len(CASES)} distinct bad inputs, each run on SQLite and on PostgreSQL")
    assert len(CASES) >= 100


# --- what no input may break ----------------------------------------------------------------


def test_one_tenants_backlog_does_not_refuse_anothers_first_batch(hostile: Hostile) -> None:
    """A fills the critical tier (no case uses it); A's next batch is a 429 that names only A's
    numbers, and B's first batch is admitted all the same."""
    a, b = hostile.tenant(), hostile.tenant()
    slow = jsonl([line(f"s{i}", max_tokens=64, ignore_eos=True) for i in range(45)])
    b_early = b.create(
        input_file_id=b.upload(jsonl([line("e", max_tokens=1)])).json()["id"],
        metadata={"tier": "critical"},
    )
    a_file = a.upload(slow).json()["id"]
    a_batches = [a.create(input_file_id=a_file, metadata={"tier": "critical"}) for _ in range(2)]
    assert [r.status_code for r in a_batches] == [200, 200], [r.text for r in a_batches]
    refused = a.create(input_file_id=a_file, metadata={"tier": "critical"})
    assert refused.status_code == 429 and refused.headers["retry-after"], refused.text
    message = refused.json()["error"]["message"]
    assert "your" in message and "100" not in message and "91" not in message, message
    b_first = b.create(input_file_id=b.upload(slow).json()["id"], metadata={"tier": "critical"})
    assert b_first.status_code == 200, b_first.text
    for t, r in [(b, b_early), (a, a_batches[0]), (a, a_batches[1]), (b, b_first)]:
        t.http().post(f"/batches/{r.json()['id']}/cancel")


def test_idempotency_keys_are_each_tenants_own(hostile: Hostile) -> None:
    """`acme` with key `team:nightly` and `acme:team` with key `nightly` no longer collide; the
    same key with the same request is the same batch."""
    suffix = uuid.uuid4().hex[:6]
    acme = Tenant(hostile, f"acme{suffix}", hostile.api.key(f"acme{suffix}"))
    team = Tenant(hostile, f"acme{suffix}:team", hostile.api.key(f"acme{suffix}:team"))
    one = acme.create(headers={"Idempotency-Key": "team:nightly"}, metadata={"who": "acme"})
    two = team.create(headers={"Idempotency-Key": "nightly"})
    assert one.status_code == two.status_code == 200
    assert one.json()["id"] != two.json()["id"] and not two.json()["metadata"]
    again = acme.create(headers={"Idempotency-Key": "team:nightly"}, metadata={"who": "acme"})
    assert again.status_code == 200 and again.json()["id"] == one.json()["id"]
    other = team.create(headers={"Idempotency-Key": "team:nightly"})
    assert other.status_code == 200 and other.json()["id"] not in (one.json()["id"],)
    for t, r in ((acme, one), (team, two), (team, other)):
        t.http().post(f"/batches/{r.json()['id']}/cancel")


def test_a_batch_the_flow_refuses_fails_at_once(hostile: Hostile) -> None:
    """A run that raises ends its batch `failed` with the reason (no server path in it), instead
    of `validating` for ever; its requests stop counting against anyone's admission."""
    t = hostile.tenant()
    fid = t.file_id(2)
    with session(hostile.api.db) as s:
        from offline_queue.store.tables import FileChunk

        # the file's bytes are gone from under the batch
        s.execute(delete(FileChunk).where(FileChunk.file_id == fid))
    created = t.create(input_file_id=fid)
    assert created.status_code == 200, created.text
    bid = created.json()["id"]

    def ended() -> dict[str, Any] | None:
        b: dict[str, Any] = t.http().get(f"/batches/{bid}").json()
        return b if b["status"] in ("failed", "completed", "cancelled", "expired") else None

    done = wait_for(ended, timeout=120, interval=0.5)
    assert done is not None
    assert done["status"] == "failed" and done["errors"]["data"], done
    assert str(hostile.data_dir) not in json.dumps(done["errors"])


def test_listing_shows_only_the_tenants_own_and_pages(hostile: Hostile) -> None:
    a, b = hostile.tenant(), hostile.tenant()
    mine = [a.batch_id() for _ in range(3)]
    theirs = b.batch_id()
    seen: list[str] = []
    after = None
    while True:
        page = a.http().get("/batches", params={"limit": 1, **({"after": after} if after else {})})
        assert page.status_code == 200
        data = page.json()
        seen += [x["id"] for x in data["data"]]
        if not data["has_more"]:
            break
        after = data["last_id"]
    assert sorted(seen) == sorted(mine)
    # another tenant's id as `after` is ignored: it neither reveals nor skips anything
    assert [x["id"] for x in a.http().get("/batches", params={"after": theirs}).json()["data"]]
    for bid in mine:
        a.http().post(f"/batches/{bid}/cancel")
    b.http().post(f"/batches/{theirs}/cancel")


def test_an_upload_does_not_hold_up_other_tenants(hostile: Hostile) -> None:
    """While one tenant streams an upload slowly, another's requests are answered at once: the
    upload route never holds the event loop."""
    slow, quick = hostile.tenant(), hostile.tenant()
    quick_file = quick.file_id()
    started = threading.Event()

    def trickle() -> Iterator[bytes]:
        yield b"--b\r\n" + FILE_HEAD + b"\r\n\r\n"
        started.set()
        for _ in range(20):
            time.sleep(0.1)
            yield good_line()
        yield b"\r\n--b\r\n" + PURPOSE[0] + b"\r\n\r\nbatch\r\n--b--\r\n"

    result: dict[str, httpx.Response] = {}
    th = threading.Thread(
        target=lambda: result.update(
            r=slow.http().post(
                "/files",
                content=trickle(),
                headers={"Content-Type": "multipart/form-data; boundary=b"},
            )
        )
    )
    th.start()
    started.wait(10)
    with quick.http() as c:
        for _ in range(5):
            began = time.monotonic()
            assert c.get(f"/files/{quick_file}").status_code == 200
            assert time.monotonic() - began < 1.0
    th.join(30)
    assert result["r"].status_code == 200, result["r"].text


def test_access_log_names_tenant_and_status_never_the_key(hostile: Hostile) -> None:
    t = hostile.tenant()
    t.http().get("/batches")
    anon(t, Authorization=f"Bearer {t.key}x").get("/batches")  # a failed login is logged too
    log = hostile.access_log.read_text()
    assert f"GET /v1/batches 200 tenant={t.name}" in log
    assert "GET /v1/batches 401 tenant=-" in log
    assert t.key not in log and "oq-" not in log


def test_files_are_private(hostile: Hostile, tmp_path: Path) -> None:
    t = hostile.tenant()
    t.file_id()  # held in the store: the store file is private, and so is the data dir
    assert stat.S_IMODE(hostile.data_dir.stat().st_mode) == 0o700
    if hostile.db_file is not None:
        assert stat.S_IMODE(hostile.db_file.stat().st_mode) == 0o600
    # Uploads kept in a directory (`files_root`) are 0600 in a directory of 0700.
    root = tmp_path / "uploads"

    async def one_block() -> AsyncIterator[bytes]:
        yield b'{"custom_id": "a"}\n'

    row = asyncio.run(
        store_upload(
            one_block(), Limits(), Upload(t.name, "f", "batch"), db=hostile.api.db, root=str(root)
        )
    )
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert stat.S_IMODE(Path(row.path).stat().st_mode) == 0o600


def test_keys_list_and_revoke(hostile: Hostile, prefect_api: str) -> None:
    t = hostile.tenant()
    assert t.http().get("/batches").status_code == 200
    env = cli_env(prefect_api)
    listed = run_cli("keys", "list", "--tenant", t.name, "--db", hostile.api.db, env=env)
    assert listed.returncode == 0 and t.name in listed.stdout, listed.stderr
    from offline_queue.api.auth import digest

    key_id = digest(t.key)[:12]
    assert key_id in listed.stdout and t.key not in listed.stdout
    revoked = run_cli("keys", "revoke", key_id, "--db", hostile.api.db, env=env)
    assert revoked.returncode == 0, revoked.stderr
    assert t.http().get("/batches").status_code == 401
    assert run_cli("keys", "revoke", key_id, "--db", hostile.api.db, env=env).returncode == 1


def test_zz_no_batch_left_running(hostile: Hostile) -> None:
    """After every case: every batch of this store ends (the cases cancelled theirs)."""

    def running() -> list[str]:
        with session(hostile.api.db) as s:
            return list(
                s.scalars(
                    select(Batch.id).where(
                        Batch.status.not_in(["completed", "failed", "cancelled", "expired"])
                    )
                )
            )

    for bid in running():  # those a case left, cancelled from the store's side
        from offline_queue.store import batches

        batches.request_cancel(hostile.api.db, bid)
    wait_for(lambda: not running(), timeout=300, interval=1)
    wait_for(  # and their run threads are over
        lambda: not [t for t in threading.enumerate() if t.name.startswith("run-batch_")],
        timeout=120,
        interval=0.5,
    )
