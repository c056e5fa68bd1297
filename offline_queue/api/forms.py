"""An upload's multipart form, parsed as it streams in (python-multipart's push parser), its file's
first lines sniffed on the way (validate.Sniffer): a file that is not a batch is a 400 at upload,
not a batch `validating` for ever. Not FastAPI's File()/Form(), which spool the whole body before
any dependency runs: here the gate has checked the key and the size first, and the file's bytes
go straight to the upload writer as they arrive."""

from __future__ import annotations

from python_multipart.multipart import MultipartParser, parse_options_header

from offline_queue.files import UploadRefused
from offline_queue.validate import FileRefused, Limits, Sniffer

MAX_PARTS = 8
MAX_FIELD_BYTES = 1024
MAX_FILENAME = 255
FIELDS = ("file", "purpose")


class Form:
    """Feed it the body's blocks; `feed` returns the file part's bytes found in each block.
    `purpose` and `filename` are known once their part has ended (the SDK sends the purpose
    first)."""

    def __init__(self, content_type: str):
        kind, options = parse_options_header(content_type)
        boundary = options.get(b"boundary")
        if kind != b"multipart/form-data" or not boundary or len(boundary) > 200:
            raise UploadRefused(400, "send the upload as multipart/form-data (file, purpose)")
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.file_seen = False
        self.ended = False
        self._out: list[bytes] = []
        self._parts = 0
        self._header_name = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._name: str | None = None
        self._value = b""
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._part_begin,
                "on_header_field": self._header_field,
                "on_header_value": self._header_value_,
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._data,
                "on_part_end": self._part_end,
                "on_end": self._end,
            },
        )

    def feed(self, block: bytes) -> list[bytes]:
        try:
            self._parser.write(block)
        except UploadRefused:
            raise
        except Exception as exc:  # python-multipart's parse errors
            raise UploadRefused(400, "malformed multipart body") from exc
        out, self._out = self._out, []
        return out

    def finish(self) -> None:
        try:
            self._parser.finalize()
        except Exception as exc:
            raise UploadRefused(400, "malformed multipart body") from exc
        if not self.ended:
            raise UploadRefused(400, "the multipart body ended early")
        if not self.file_seen:
            raise UploadRefused(400, "no file part: send the file as the form field `file`")
        check_purpose(self.fields.get("purpose"), final=True)

    def _part_begin(self) -> None:
        self._parts += 1
        if self._parts > MAX_PARTS:
            raise UploadRefused(400, f"more than {MAX_PARTS} form fields")
        self._headers, self._name, self._value = {}, None, b""

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_value_(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._header_name.lower()] = self._header_value
        self._header_name = self._header_value = b""

    def _headers_finished(self) -> None:
        kind, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("latin-1")
        if kind != b"form-data" or name not in FIELDS:
            raise UploadRefused(400, "unknown form field: the form has `file` and `purpose`")
        if name in self.fields or (name == "file" and self.file_seen):
            raise UploadRefused(400, f"form field `{name}` given twice")
        self._name = name
        if name == "file":
            self.file_seen = True
            self.filename = _filename(options.get(b"filename"))

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._name == "file":
            self._out.append(data[start:end])
            return
        self._value += data[start:end]
        if len(self._value) > MAX_FIELD_BYTES:
            raise UploadRefused(400, f"form field `{self._name}` is over {MAX_FIELD_BYTES} bytes")

    def _part_end(self) -> None:
        if self._name and self._name != "file":
            try:
                self.fields[self._name] = self._value.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise UploadRefused(400, f"form field `{self._name}`: not UTF-8") from exc
            if self._name == "purpose":
                check_purpose(self.fields["purpose"])

    def _end(self) -> None:
        self.ended = True


def check_purpose(purpose: str | None, final: bool = False) -> None:
    if purpose is None and not final:
        return
    if purpose != "batch":
        raise UploadRefused(400, "purpose: only 'batch' is supported")


def _filename(raw: bytes | None) -> str:
    if not raw:
        return "batch.jsonl"
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UploadRefused(400, "filename: not UTF-8") from exc
    if len(name) > MAX_FILENAME or not name.isprintable() or not name.strip():
        raise UploadRefused(
            400, f"filename: 1 to {MAX_FILENAME} printable characters (no NUL, no newline)"
        )
    return name


class FileSniff:
    """Splits the file's first lines (each cut at max_line_bytes) and feeds them to a
    validate.Sniffer; refuses at once what cannot be a batch, and at the end what had no
    request line."""

    GZIP = b"\x1f\x8b"

    def __init__(self, limits: Limits):
        self.limits = limits
        self.sniffer = Sniffer(limits)
        self._line = bytearray()
        self._too_long = False
        self._started = False

    @property
    def url(self) -> str | None:
        return self.sniffer.url

    def feed(self, block: bytes) -> None:
        if not self._started and block:
            self._started = True
            if block.startswith(self.GZIP):
                raise UploadRefused(400, "the file is gzip-compressed: upload the JSONL itself")
        start = 0
        while not self.sniffer.done and start < len(block):
            nl = block.find(b"\n", start)
            end = nl if nl >= 0 else len(block)
            room = self.limits.max_line_bytes - len(self._line)
            if end - start > room:
                self._too_long = True
            else:
                self._line += block[start:end]
            if nl < 0:
                return
            self._take()
            start = nl + 1
        self._refuse_if_done()

    def finish(self) -> None:
        if self._line or self._too_long:
            self._take()
        try:
            self.sniffer.verdict("the file")
        except FileRefused as exc:
            raise UploadRefused(400, str(exc)) from exc

    def _take(self) -> None:
        self.sniffer.line(bytes(self._line).rstrip(b"\r"), self._too_long)
        self._line.clear()
        self._too_long = False

    def _refuse_if_done(self) -> None:
        if self.sniffer.done and not self.sniffer.saw_json:
            self.finish()
