"""Where a batch's files are — a local path, an fsspec URL (`s3://`, `gs://`, `az://`) or
`store://<file id>` in the store — and one way to stream them, read or written, whatever the
place: nodes share no disk. (docs/ARCHITECTURE.md, Why the parts are as they are)
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, cast

from offline_queue.store import files
from offline_queue.store.db import resolve_url

OPTIONS_VAR = "OFFLINE_QUEUE_STORAGE_OPTIONS"
READ_BUFFER = 1 << 16
REMOTE_BLOCK = 8 << 20
"""fsspec's block per request (S3's multipart parts must be at least 5 MiB); s3fs's own
default, 50 MiB, would hold that much of every file being read or written in memory."""

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_EXTRAS = {
    "s3": ("s3", "s3fs"),
    "s3a": ("s3", "s3fs"),
    "gs": ("gcs", "gcsfs"),
    "gcs": ("gcs", "gcsfs"),
    "az": ("azure", "adlfs"),
    "abfs": ("azure", "adlfs"),
    "abfss": ("azure", "adlfs"),
    "adl": ("azure", "adlfs"),
}


class StorageUnavailable(RuntimeError):
    """The location names a storage this installation cannot reach (a package is missing, the
    URL is not one fsspec knows, or the place takes no writes)."""


class Location(ABC):
    """A file somewhere: its size, a stream of its bytes, a whole-or-nothing write."""

    def __init__(self, text: str):
        self.text = text

    def __str__(self) -> str:
        return self.text

    @abstractmethod
    def size(self) -> int:
        """Bytes; FileNotFoundError when there is no such file."""

    @abstractmethod
    def open_read(self) -> BinaryIO:
        """A buffered binary reader (close it, or use it as a context manager)."""

    @abstractmethod
    def writing(self) -> contextlib.AbstractContextManager[BinaryIO]:
        """A binary writer whose file appears whole when the block ends, and not at all when
        it raises."""

    @abstractmethod
    def remove(self) -> bool:
        """Delete the file; whether there was one."""

    def exists(self) -> bool:
        try:
            self.size()
        except FileNotFoundError:
            return False
        return True


class LocalFile(Location):
    def __init__(self, path: Path):
        super().__init__(str(path))
        self.path = path

    def size(self) -> int:
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such file")
        return self.path.stat().st_size

    def open_read(self) -> BinaryIO:
        return self.path.open("rb")

    @contextlib.contextmanager
    def writing(self) -> Iterator[BinaryIO]:
        # Beside the final name (same file system: the rename is atomic), named per process so
        # two workers finishing one batch never write into each other's file.
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        # 0600 in a new directory of 0700: a tenant's requests and answers are nobody else's.
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as out:
                yield out
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)

    def remove(self) -> bool:
        existed = self.path.exists()
        self.path.unlink(missing_ok=True)
        return existed


class RemoteFile(Location):
    """A file behind fsspec (object storage first of all)."""

    def __init__(self, url: str, options: dict[str, Any] | None = None):
        super().__init__(url)
        match = _SCHEME.match(url)
        protocol = match.group(1).lower() if match else "file"
        opts = options if options is not None else storage_options(protocol)
        try:
            import fsspec

            self.fs, self.path = fsspec.core.url_to_fs(url, **opts)
        except ImportError as exc:
            extra, package = _EXTRAS.get(protocol, (None, None))
            hint = (
                f"install offline-queue[{extra}] ({package})"
                if extra
                else f"install the fsspec implementation for {protocol}:// ({exc})"
            )
            raise StorageUnavailable(f"{url}: {hint}") from exc
        except ValueError as exc:  # "Protocol not known"
            raise StorageUnavailable(f"{url}: {exc}") from exc

    def size(self) -> int:
        try:
            info = self.fs.info(self.path)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{self.text}: no such file") from exc
        if info.get("type") == "directory":
            raise FileNotFoundError(f"{self.text}: a directory, not a file")
        return int(info["size"])

    def open_read(self) -> BinaryIO:
        raw = self.fs.open(self.path, "rb", block_size=REMOTE_BLOCK)
        # fsspec's own readline takes no limit: a buffered reader's does.
        return cast(BinaryIO, io.BufferedReader(raw, READ_BUFFER))

    @contextlib.contextmanager
    def writing(self) -> Iterator[BinaryIO]:
        out = self.fs.open(self.path, "wb", block_size=REMOTE_BLOCK)
        try:
            yield out
        except BaseException:
            with contextlib.suppress(Exception):
                out.discard()  # S3: abort the multipart upload
            with contextlib.suppress(Exception):
                out.closed = True  # so that not even the garbage collector completes it
            raise
        out.close()  # completes the upload: the object appears whole

    def remove(self) -> bool:
        try:
            self.fs.rm(self.path)
        except FileNotFoundError:
            return False
        return True


class StoreFile(Location):
    """A file held in the store: readable by every node through the database. Written by an
    upload (`offline_queue.files.store_upload`), never as a batch's output — those are the
    batch's result rows already (`offline_queue.batches.output_lines`)."""

    def __init__(self, db: str, file_id: str):
        super().__init__(files.store_path(file_id))
        self.db, self.file_id = db, file_id

    def size(self) -> int:
        row = files.get_file(self.db, self.file_id)
        if row is None or row.path != self.text:
            raise FileNotFoundError(f"{self.text}: no such file in the store")
        return row.bytes

    def open_read(self) -> BinaryIO:
        return cast(BinaryIO, files.open_chunks(self.db, self.file_id, READ_BUFFER))

    def writing(self) -> contextlib.AbstractContextManager[BinaryIO]:
        raise StorageUnavailable(
            f"{self.text}: files in the store are written by an upload; a batch's outputs "
            "in the store are its results (store://<batch id>-output)"
        )

    def remove(self) -> bool:
        return files.remove_rows(self.db, [self.file_id]) > 0


def storage_options(protocol: str) -> dict[str, Any]:
    """fsspec options for `protocol` from OFFLINE_QUEUE_STORAGE_OPTIONS ({} when unset)."""
    raw = os.environ.get(OPTIONS_VAR)
    if not raw:
        return {}
    try:
        options = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise StorageUnavailable(f"{OPTIONS_VAR} is not JSON: {exc}") from exc
    if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()):
        raise StorageUnavailable(
            f'{OPTIONS_VAR}: options by protocol, like {{"s3": {{"endpoint_url": "…"}}}}'
        )
    return dict(options.get(protocol, {}))


def is_local(text: str) -> bool:
    return _SCHEME.match(text) is None or text.startswith("file://")


def resolve(text: str) -> str:
    """The location as stored on a batch: a local path made absolute (`~` expanded, relative to
    the current directory), a URL as it is."""
    if text.startswith("file://"):
        text = text.removeprefix("file://")
    if is_local(text):
        return str(Path(text).expanduser().resolve())
    return text


def locate(where: Location | str | Path, db: str | None = None) -> Location:
    """The location `where` names. `db` is the store that holds `store://` files (default: the
    configured one, OFFLINE_QUEUE_DB)."""
    if isinstance(where, Location):
        return where
    if isinstance(where, Path):
        return LocalFile(where.expanduser())
    if where.startswith(files.STORE_SCHEME):
        return StoreFile(resolve_url(db), where.removeprefix(files.STORE_SCHEME))
    if is_local(where):
        return LocalFile(Path(where.removeprefix("file://")).expanduser())
    return RemoteFile(where)


def sibling(text: str, name: str) -> str:
    """The location named `name` in the same directory (or key prefix) as `text`."""
    if is_local(text):
        return str(Path(text).with_name(name))
    head, _, _ = text.rpartition("/")
    return f"{head}/{name}"
