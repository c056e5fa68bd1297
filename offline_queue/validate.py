"""Streaming validation of a batch file: one line in memory at a time, errors as data. The file is
anywhere offline_queue/storage.py reaches; only `readline(n)` on its binary stream is asked of it.
A bad line becomes a `Rejected` naming the line and the field, and the batch goes on; only a file
that is not a batch at all (empty, not JSONL, over the limits) is refused whole.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from pydantic import ValidationError

from offline_queue.batch_object import LineError
from offline_queue.catalog import Catalog, ServedModel
from offline_queue.content import ContentHash
from offline_queue.findings import Accepted, FileInfo, Rejected
from offline_queue.formats import BODY_TYPES, REQUEST_LINE, SUPPORTED_URLS, AnyLine, Body
from offline_queue.prefix import prefix_key
from offline_queue.storage import Location, StorageUnavailable, locate

# Fields that do not change what the model generates: left out of the cache key.
_NOT_IN_CACHE_KEY = frozenset({"model", "user", "metadata", "store", "service_tier", "stream"})
_READ_BLOCK = 1 << 16
_MAX_CUSTOM_ID = 512  # the custom_id columns' length, as formats.CustomId allows


@dataclass(frozen=True)
class Limits:
    """What one batch file may hold. Raising them costs memory only in the duplicate check
    (about 100 bytes per custom_id); a line is never held in memory beyond `max_line_bytes`."""

    max_line_bytes: int = 1 << 20
    """A longer line is rejected on its own (read up to this size, the rest skipped)."""
    max_lines: int = 5_000_000
    """More lines than this and the file is refused: split it into several batches."""
    max_file_bytes: int = 4 << 30
    """A larger file is refused before anything is queued."""
    sniff_lines: int = 100
    """If none of the first non-blank lines is JSON, the file is refused as not JSONL."""


class FileRefused(ValueError):
    """The file as a whole is not a batch; nothing from it is queued."""


Source = Location | str | Path
"""A batch file: a Location, or what `offline_queue.storage.locate` takes (a `store://` file is
read from the configured store; pass a StoreFile to name another)."""


def iter_raw_lines(
    source: Source, max_line_bytes: int, tap: Callable[[bytes], None] | None = None
) -> Iterator[tuple[int, bytes, bool]]:
    """(line number from 1, bytes without the newline, whether it was cut at the size limit).

    `tap` sees every byte read, the drained rest of an over-long line included: the content
    hash is of the whole file, taken in the same pass."""
    with locate(source).open_read() as handle:
        line_no = 0
        while True:
            raw = handle.readline(max_line_bytes + 1)
            if not raw:
                return
            if tap is not None:
                tap(raw)
            line_no += 1
            too_long = len(raw) > max_line_bytes and not raw.endswith(b"\n")
            if too_long:  # drain the rest of the line without holding it
                while True:
                    rest = handle.readline(_READ_BLOCK)
                    if tap is not None:
                        tap(rest)
                    if not rest or rest.endswith(b"\n"):
                        break
            yield line_no, raw.rstrip(b"\r\n"), too_long


class Sniffer:
    """Whether a file is a batch at all, from its first lines: fed line by line (by
    `inspect_file` from disk, by the API as an upload streams in), it refuses a file with no
    request line (only blank lines) and one none of whose first `sniff_lines` non-blank lines is
    JSON (gzip, binary, CSV, ...). It also notes the url of the first request line, so a batch
    can be checked against the endpoint its lines are for."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.sniffed = 0
        self.saw_json = False
        self.url: str | None = None
        """The first line's url that names a supported endpoint, if one came before the end of
        the sniff."""

    @property
    def done(self) -> bool:
        return self.url is not None or self.sniffed >= self.limits.sniff_lines

    def line(self, raw: bytes, too_long: bool) -> None:
        if self.done or too_long or not raw.strip():
            return
        self.sniffed += 1
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return
        self.saw_json = True
        if isinstance(obj, dict) and obj.get("url") in SUPPORTED_URLS:
            self.url = obj["url"]

    def verdict(self, name: str) -> None:
        """Raise FileRefused if what was fed is not a batch file."""
        if self.saw_json:
            return
        if self.sniffed == 0:
            raise FileRefused(f"{name}: the file has no request lines (only blank lines)")
        raise FileRefused(
            f"{name}: not JSONL: none of the first {self.sniffed} non-blank lines is JSON"
        )


PEEK_LINES = 10_000
"""Lines `inspect_file` validates at most looking for the models a batch's lines name."""
MAX_NAMED = 16
"""Distinct (url, model) pairs kept: a batch names one model; the rest are its lines' errors."""


def inspect_file(source: Source, limits: Limits, seen: FileInfo | None = None) -> FileInfo:
    """One streaming pass: content hash, line count, the models the lines name, and the
    whole-file refusals. The pass that queues the file is the only other read of it: `seen`,
    what a caller found, stands for the file while its size is the same."""
    try:
        path = locate(source)
        size = path.size()
    except FileNotFoundError as exc:
        raise FileRefused(f"{source}: no such file") from exc
    except StorageUnavailable as exc:
        raise FileRefused(str(exc)) from exc
    if seen is not None and seen.size == size:
        return seen  # a caller looked already, and the file has not changed size since
    if size == 0:
        raise FileRefused(f"{path}: the file is empty")
    if size > limits.max_file_bytes:
        raise FileRefused(
            f"{path}: {size} bytes is over the limit of {limits.max_file_bytes} bytes "
            "(max_file_bytes)"
        )
    digest = ContentHash()
    lines = 0
    sniffer = Sniffer(limits)
    named: dict[tuple[str, str], None] = {}  # ordered, each pair once
    for line_no, raw, too_long in iter_raw_lines(path, limits.max_line_bytes, digest.update):
        lines += 1
        if lines > limits.max_lines:
            raise FileRefused(f"{path}: more than {limits.max_lines} lines (max_lines)")
        sniffer.line(raw, too_long)
        if lines <= PEEK_LINES and len(named) < MAX_NAMED and raw.strip():
            item = validate_line(line_no, raw, too_long, limits)
            if isinstance(item, Accepted):
                named.setdefault((item.url, item.model), None)
    sniffer.verdict(str(path))
    return FileInfo(digest.hexdigest(), size, lines, tuple(named))


def _field(loc: tuple[int | str, ...]) -> str:
    parts = list(loc)
    if parts and parts[0] in SUPPORTED_URLS:  # the discriminated union puts the tag first
        parts = parts[1:]
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "line"


def _message(error: Any) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown field (neither an OpenAI nor a vLLM sampling parameter)"
    if kind == "missing":
        return "required"
    if kind == "union_tag_invalid":
        tag = (error.get("ctx") or {}).get("tag", error["input"])
        return f"unsupported url {tag!r}; supported: {', '.join(SUPPORTED_URLS)}"
    if kind == "union_tag_not_found":
        return "required"
    msg = str(error["msg"])
    msg = msg.removeprefix("Value error, ")
    return msg[:1].lower() + msg[1:]


def describe(line_no: int, exc: ValidationError) -> str:
    errors = exc.errors(include_url=False)
    parts = [f"{_field(e['loc'])}: {_message(e)}" for e in errors[:3]]
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return f"line {line_no}: " + "; ".join(parts) + more


def cache_digest(url: str, body: Body, dumped: dict[str, Any]) -> str | None:
    """Digest of the canonical body when the request is deterministic, else None. `dumped` is
    the body's `model_dump(mode="json", exclude_none=True, by_alias=True)`, already serialized
    by the caller: it is consumed (the keys left out of the key are deleted from it)."""
    if not body.is_deterministic():
        return None
    for key in _NOT_IN_CACHE_KEY.intersection(dumped):
        del dumped[key]
    prefix = _DIGEST_PREFIX.get(url)
    digest = prefix.copy() if prefix else hashlib.sha256(url.encode() + b"\n")
    digest.update(orjson.dumps(dumped, option=orjson.OPT_SORT_KEYS))
    return digest.hexdigest()


# sha256 over "url\n" already, per supported url: copying it is cheaper than starting anew.
_DIGEST_PREFIX = {url: hashlib.sha256(url.encode() + b"\n") for url in SUPPORTED_URLS}


def _storable_id(raw_id: object) -> str | None:
    """The custom_id a rejected line's error row can carry: none when it would not fit the
    column (too long, or holding a NUL), so the error row is still written."""
    if not isinstance(raw_id, str):
        return None
    custom_id = raw_id.strip()
    if not custom_id or len(custom_id) > _MAX_CUSTOM_ID or "\x00" in custom_id:
        return None
    return custom_id


def _reject(line_no: int, custom_id: str | None, message: str) -> Rejected:
    return Rejected(
        line_no, custom_id, LineError(code="invalid_request", message=message, line=line_no)
    )


# The per-line path calls pydantic-core directly: the same validator and serializer that
# `REQUEST_LINE.validate_python` and `model_dump` wrap, without their Python-level overhead
# (~0.8 µs a line of ~10).
_validate_request = REQUEST_LINE.validator.validate_python
_validate_body = {
    url: cls.__pydantic_validator__.validate_python for url, cls in BODY_TYPES.items()
}
_dump_body = {cls: cls.__pydantic_serializer__.to_python for cls in BODY_TYPES.values()}


def validate_line(line_no: int, raw: bytes, too_long: bool, limits: Limits) -> Accepted | Rejected:
    if too_long:
        return _reject(
            line_no,
            None,
            f"line {line_no}: longer than {limits.max_line_bytes} bytes (max_line_bytes)",
        )
    try:
        obj = orjson.loads(raw)  # refuses invalid UTF-8 anywhere in the line
    except orjson.JSONDecodeError as exc:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as bad:
            return _reject(line_no, None, f"line {line_no}: not valid UTF-8 (byte {bad.start})")
        return _reject(line_no, None, f"line {line_no}: not JSON ({exc})")
    if not isinstance(obj, dict):
        return _reject(line_no, None, f"line {line_no}: not a JSON object ({type(obj).__name__})")
    body: Body | None = None
    custom_id, url = obj.get("custom_id"), obj.get("url")
    if (
        # The common line, whose envelope the line model would pass through unchanged: the
        # four fields, POST, a supported url, and a custom_id with nothing to strip (no
        # leading/trailing space, nothing non-printable: no other whitespace, no NUL) and
        # within 512 characters. Only its body goes through pydantic; anything else, or a body
        # that fails, takes the whole line model below, so verdicts and messages are the same.
        len(obj) == 4
        and type(url) is str
        and type(custom_id) is str
        and url in _validate_body
        and obj.get("method") == "POST"
        and "body" in obj
        and 0 < len(custom_id) <= _MAX_CUSTOM_ID
        and custom_id.isprintable()
        and custom_id[0] != " "
        and custom_id[-1] != " "
    ):
        with contextlib.suppress(ValidationError):  # the line model below names the field
            body = _validate_body[url](obj["body"])
    if body is None:
        try:
            request: AnyLine = _validate_request(obj)
        except ValidationError as exc:
            return _reject(line_no, _storable_id(custom_id), describe(line_no, exc))
        if "\x00" in request.custom_id:  # no database text column holds it
            return _reject(
                line_no, None, f"line {line_no}: custom_id: must not contain the NUL character"
            )
        body, custom_id, url = request.body, request.custom_id, request.url
    assert isinstance(custom_id, str) and isinstance(url, str)
    # One dump serves both the stored body and the cache key.
    dumped = _dump_body[type(body)](body, mode="json", exclude_none=True, by_alias=True)
    body_json = orjson.dumps(dumped).decode()
    key, model = prefix_key(dumped), str(dumped.get("model", ""))  # before cache_digest,
    digest = cache_digest(url, body, dumped)  # which consumes `dumped`
    return Accepted(line_no, custom_id, url, body_json, digest, key, model)


def validate_file(
    source: Source,
    limits: Limits,
    start_after: int = 0,
    seen: set[str] | None = None,
    catalog: Catalog | None = None,
    batch_model: ServedModel | None = None,
) -> Iterator[Accepted | Rejected]:
    """Every non-blank line past `start_after`, accepted or rejected, in file order.

    `seen` holds the custom_ids already accepted (from an earlier, interrupted pass), so a
    duplicate is caught across a resume too. Every duplicate after the first is rejected.

    With a `catalog`, a line whose model is not served, does not serve its url, or is another
    model than `batch_model` (None: the first accepted line's) is rejected naming the field and
    the served models.
    """
    seen = set() if seen is None else seen
    for line_no, raw, too_long in iter_raw_lines(source, limits.max_line_bytes):
        if line_no <= start_after or not raw.strip():
            continue
        item = validate_line(line_no, raw, too_long, limits)
        if isinstance(item, Accepted):
            if item.custom_id in seen:
                item = _reject(
                    line_no,
                    item.custom_id,
                    f"line {line_no}: custom_id: duplicate {item.custom_id!r} "
                    "(each custom_id must be unique in the batch)",
                )
            elif catalog is not None and (why := catalog.check(item.url, item.model, batch_model)):
                item = _reject(line_no, item.custom_id, f"line {line_no}: {why}")
            else:
                seen.add(item.custom_id)
                if catalog is not None and batch_model is None:
                    batch_model = catalog.find(item.model)
        yield item
