"""Hostile input: every bad line is named with its line and field; good lines still pass."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from offline_queue.content import ContentHash
from offline_queue.files import store_upload
from offline_queue.findings import Accepted, Rejected
from offline_queue.store.files import Upload
from offline_queue.validate import FileRefused, Limits, inspect_file, validate_file


def chat(custom_id: str, **body: object) -> dict:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}], **body},
    }


def write(path: Path, lines: list[object]) -> Path:
    with path.open("wb") as f:
        for line in lines:
            if isinstance(line, bytes):
                f.write(line + b"\n")
            elif isinstance(line, str):
                f.write(line.encode() + b"\n")
            else:
                f.write(json.dumps(line).encode() + b"\n")
    return path


GOOD = chat("good")

# (line, what the error must name)
HOSTILE: list[tuple[object, list[str]]] = [
    ("this is not json", ["line 2", "not JSON"]),
    ("[1, 2, 3]", ["line 2", "not a JSON object"]),
    ({**GOOD, "custom_id": ""}, ["line 2", "custom_id"]),
    ({**GOOD, "custom_id": "   "}, ["line 2", "custom_id"]),
    ({k: v for k, v in GOOD.items() if k != "custom_id"}, ["line 2", "custom_id", "required"]),
    ({**GOOD, "custom_id": 17}, ["line 2", "custom_id"]),
    ({**GOOD, "method": "GET"}, ["line 2", "method", "POST"]),
    ({**GOOD, "url": "/v1/moderations"}, ["line 2", "url", "/v1/moderations", "supported"]),
    ({**GOOD, "url": "/v1/embeddings"}, ["line 2", "body.input", "required"]),
    (
        {**GOOD, "url": "/v1/embeddings", "body": {"model": "m", "input": ""}},
        ["line 2", "body.input"],
    ),
    (
        {**GOOD, "url": "/v1/embeddings", "body": {"model": "m", "input": "x", "dimensions": 0}},
        ["line 2", "body.dimensions", "greater than 0"],
    ),
    (
        {**GOOD, "url": "/v1/responses", "body": {"model": "m", "input": "x", "stream": True}},
        ["line 2", "body.stream"],
    ),
    (
        {**GOOD, "url": "/v1/responses", "body": {"model": "m", "input": "x", "tools": []}},
        ["line 2", "body.tools", "unknown field"],
    ),
    ({**GOOD, "body": "text"}, ["line 2", "body"]),
    ({**GOOD, "body": {"model": "m"}}, ["line 2", "body.messages", "required"]),
    ({**GOOD, "body": {"model": "m", "messages": []}}, ["line 2", "body.messages"]),
    (
        {**GOOD, "body": {"model": "m", "messages": [{"role": "wizard", "content": "x"}]}},
        ["line 2", "body.messages[0].role"],
    ),
    (chat("x", max_tokens=-5), ["line 2", "body.max_tokens", "greater than 0"]),
    (chat("x", max_tokens=0), ["line 2", "body.max_tokens"]),
    (chat("x", max_tokens=10**12), ["line 2", "body.max_tokens"]),
    (chat("x", temperature=3.5), ["line 2", "body.temperature"]),
    (chat("x", temperature=-1), ["line 2", "body.temperature"]),
    (chat("x", top_p=0), ["line 2", "body.top_p"]),
    (chat("x", n=0), ["line 2", "body.n"]),
    (chat("x", max_token=16), ["line 2", "body.max_token", "unknown field"]),
    (chat("x", tools=[{"type": "function"}]), ["line 2", "body.tools[0].function", "required"]),
    (
        chat(
            "x",
            tools=[{"type": "function", "function": {"name": "f"}}],
            tool_choice={"type": "function", "function": {"name": "g"}},
        ),
        ["line 2", "body", "'g', which is not in tools"],
    ),
    (chat("x", tool_choice="required"), ["line 2", "body", "tool_choice needs tools"]),
    (chat("x", stream=True), ["line 2", "body.stream"]),
    (chat("x", top_logprobs=3), ["line 2", "top_logprobs needs logprobs"]),
    (chat("x", response_format={"type": "json_schema"}), ["line 2", "body.response_format"]),
    (chat("x", logit_bias={"abc": 1}), ["line 2", "body.logit_bias"]),
    (
        {"custom_id": "c", "method": "POST", "url": "/v1/completions", "body": {"model": "m"}},
        ["line 2", "body.prompt", "required"],
    ),
    (
        {
            "custom_id": "c",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": "m", "prompt": "x", "logprobs": 50},
        },
        ["line 2", "body.logprobs"],
    ),
    ({**GOOD, "extra": 1}, ["line 2", "extra", "unknown field"]),
    ({**GOOD, "custom_id": "a\u0000b"}, ["line 2", "custom_id", "NUL"]),
    ({**GOOD, "custom_id": "x" * 600}, ["line 2", "custom_id", "512"]),
    (b'{"custom_id": "\xff\xfe", "method": "POST"}', ["line 2", "UTF-8"]),
]


@pytest.mark.parametrize(("line", "expected"), HOSTILE, ids=[str(i) for i in range(len(HOSTILE))])
def test_bad_line_is_named_and_good_lines_pass(
    tmp_path: Path, line: object, expected: list[str]
) -> None:
    path = write(tmp_path / "in.jsonl", [chat("first"), line, chat("last")])
    items = list(validate_file(path, Limits()))
    assert [type(i) for i in items] == [Accepted, Rejected, Accepted]
    rejected = items[1]
    assert isinstance(rejected, Rejected)
    assert rejected.line_no == 2 and rejected.error.code == "invalid_request"
    for fragment in expected:
        assert fragment in rejected.error.message, rejected.error.message


def test_duplicates_after_the_first_are_rejected(tmp_path: Path) -> None:
    path = write(tmp_path / "in.jsonl", [chat("a"), chat("b"), chat("a"), chat(" a "), chat("c")])
    items = list(validate_file(path, Limits()))
    verdicts = [(i.line_no, type(i).__name__) for i in items]
    assert verdicts == [
        (1, "Accepted"),
        (2, "Accepted"),
        (3, "Rejected"),
        (4, "Rejected"),
        (5, "Accepted"),
    ]
    assert "duplicate 'a'" in items[2].error.message  # type: ignore[union-attr]


def test_line_over_the_size_limit_is_rejected_alone(tmp_path: Path) -> None:
    huge = chat("huge", messages=[{"role": "user", "content": "x" * 5000}])
    path = write(tmp_path / "in.jsonl", [chat("a"), huge, chat("b")])
    limits = Limits(max_line_bytes=1000)
    items = list(validate_file(path, limits))
    assert [type(i) for i in items] == [Accepted, Rejected, Accepted]
    assert "line 2" in items[1].error.message and "max_line_bytes" in items[1].error.message  # type: ignore[union-attr]
    assert inspect_file(path, limits).lines == 3


def test_blank_lines_are_skipped_but_keep_numbering(tmp_path: Path) -> None:
    path = write(tmp_path / "in.jsonl", [chat("a"), "", "   ", "oops"])
    items = list(validate_file(path, Limits()))
    assert [(i.line_no, type(i)) for i in items] == [(1, Accepted), (4, Rejected)]


def test_file_with_only_bad_lines_is_not_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "in.jsonl", [chat("x", max_tokens=-1), {"custom_id": "y"}])
    inspect_file(path, Limits())  # JSON lines: a batch, whose every line fails
    assert all(isinstance(i, Rejected) for i in validate_file(path, Limits()))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty"),
        (b"\n\n  \n", "no request lines"),
        (b"hello world\nthis is a csv,file\n", "not JSONL"),
        (b"\x00\x01\x02\xff" * 100, "not JSONL"),
    ],
)
def test_whole_file_refusals(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(content)
    with pytest.raises(FileRefused, match=message):
        inspect_file(path, Limits())


def test_over_the_line_and_size_limits(tmp_path: Path) -> None:
    path = write(tmp_path / "in.jsonl", [chat(str(i)) for i in range(10)])
    with pytest.raises(FileRefused, match="max_lines"):
        inspect_file(path, Limits(max_lines=5))
    with pytest.raises(FileRefused, match="max_file_bytes"):
        inspect_file(path, Limits(max_file_bytes=100))


def test_content_hash_is_stable_and_content_sensitive(tmp_path: Path) -> None:
    a = write(tmp_path / "a.jsonl", [chat("1"), chat("2")])
    b = write(tmp_path / "b.jsonl", [chat("1"), chat("2")])
    c = write(tmp_path / "c.jsonl", [chat("1"), chat("3")])
    assert inspect_file(a, Limits()).content_hash == inspect_file(b, Limits()).content_hash
    assert inspect_file(a, Limits()).content_hash != inspect_file(c, Limits()).content_hash


def _upload_hash(data: bytes, directory: Path, block: int) -> str:
    async def blocks() -> AsyncIterator[bytes]:
        for i in range(0, len(data), block):
            yield data[i : i + block]

    db = f"sqlite:///{directory.parent / 'store.db'}"
    row = asyncio.run(store_upload(blocks(), Limits(), Upload("t", "f", "batch"), db=db))
    return row.sha256


def test_one_content_hash_for_any_line_end_and_upload_blocking(tmp_path: Path) -> None:
    """An upload and the flow name a file by the same hash, whether its lines end in LF or
    CRLF and whether the last one has a newline — else the flow refuses the API's batch as
    "other content" (the batch stalled in `validating`)."""
    lines = [json.dumps(chat(str(i))).encode() for i in range(3)]
    variants = {
        "lf": b"\n".join(lines) + b"\n",
        "no-final-newline": b"\n".join(lines),
        "crlf": b"\r\n".join(lines) + b"\r\n",
        "crlf-no-final-newline": b"\r\n".join(lines),
    }
    hashes = set()
    for name, data in variants.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_bytes(data)
        from_file = inspect_file(path, Limits()).content_hash
        hashes.add(from_file)
        for block in (1, 2, 7, 1 << 20):  # a CR and its LF in different blocks, too
            assert _upload_hash(data, tmp_path / "up", block) == from_file, (name, block)
    assert len(hashes) == 1
    other = tmp_path / "other.jsonl"
    other.write_bytes(variants["lf"].replace(b'"2"', b'"3"'))
    assert inspect_file(other, Limits()).content_hash not in hashes
    # A blank line is content: it is not folded away with the line ends.
    h = ContentHash()
    h.update(variants["lf"] + b"\n")
    assert h.hexdigest() not in hashes


def test_content_hash_covers_the_whole_of_an_over_long_line(tmp_path: Path) -> None:
    limits = Limits(max_line_bytes=160)
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    head = json.dumps(chat("1")).encode() + b"\n"
    a.write_bytes(head + b"x" * 400 + b"A\n")
    b.write_bytes(head + b"x" * 400 + b"B\n")
    assert inspect_file(a, limits).content_hash != inspect_file(b, limits).content_hash


def test_deterministic_requests_get_a_cache_digest(tmp_path: Path) -> None:
    path = write(
        tmp_path / "in.jsonl",
        [
            chat("greedy", temperature=0, user="alice"),
            chat("greedy-other-user", temperature=0, user="bob"),
            chat("seeded", temperature=0.8, seed=3),
            chat("sampled", temperature=0.8),
            chat("default-temperature"),
        ],
    )
    items = [i for i in validate_file(path, Limits()) if isinstance(i, Accepted)]
    digests = [i.cache_digest for i in items]
    assert digests[0] is not None and digests[0] == digests[1]  # `user` does not change output
    assert digests[2] is not None and digests[2] != digests[0]
    assert digests[3] is None and digests[4] is None


@pytest.mark.parametrize("custom_id", [" a", "a ", "\u3000a", "a\u00a0", "\ta", "a\u2028"])
def test_custom_id_is_stripped_of_any_whitespace(tmp_path: Path, custom_id: str) -> None:
    path = write(tmp_path / "in.jsonl", [chat(custom_id), chat("a"), chat("x" * 512)])
    items = list(validate_file(path, Limits()))
    assert [type(i) for i in items] == [Accepted, Rejected, Accepted]
    assert items[0].custom_id == "a" and "duplicate 'a'" in items[1].error.message  # type: ignore[union-attr]
