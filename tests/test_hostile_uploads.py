"""Hostile uploads to the API, on SQLite and PostgreSQL: empty, binary, oversized, malformed
multipart, bad file names and purposes, past a tenant's quota — each refused in OpenAI's shape
without echoing the input; a slow upload holds up no one, and what is stored is private."""

from __future__ import annotations

import asyncio
import gzip
import os
import stat
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from offline_queue.files import store_upload
from offline_queue.store.files import Upload
from offline_queue.validate import Limits
from tests.hostile_helpers import (
    FILE_HEAD,
    MARK,
    PURPOSE,
    Cases,
    Hostile,
    good_line,
    hostile_api,  # noqa: F401  # the module's fixture `hostile`
    multipart,
    no_batch_left_running,
    post_form,
    raw,
    refused_in_openais_shape,
)

pytestmark = pytest.mark.usefixtures("prefect_api")

CASES = Cases()
simple = CASES.add

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


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(hostile: Hostile, name: str) -> None:
    statuses, send = CASES[name]
    refused_in_openais_shape(send(hostile.tenant()), statuses)


# --- what no input may break ----------------------------------------------------------------


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


def test_zz_no_batch_left_running(hostile: Hostile) -> None:
    """Last in this module: no case above left a batch of this store running."""
    no_batch_left_running(hostile)
