"""The cost of files through the store, against plain local disk, on PostgreSQL.

    .venv/bin/python bench/files.py [--upload-mb 200] [--lines 1000000] [--repeats 3] [--pg URL]
    .venv/bin/python bench/files.py --quick      # 20 MB, 50,000 lines, once: about a minute

Nodes share no disk, so an API batch's files go through the store. Measured in this run,
interleaved, best of `--repeats`:

- upload: a generated batch file (bench/lines.py) streamed through `store_upload` in 1 MiB
  blocks (what POST /v1/files hands it) into the store's chunk rows, against the same call
  writing to a local directory (`root=`: the same limit checks and content hash; only where
  the bytes go differs);
- read back: the stored file read as a stream (what a worker's validation reads), against the
  local copy read from disk;
- download: a batch's output of `--lines` lines streamed from its result rows
  (`output_lines`, what GET /v1/files/{batch}-output/content sends), against reading the
  output file `write_files` wrote on local disk (what serving a file from disk reads). The
  time `write_files` takes is shown too: it is what a virtual file saves at finalize.

PostgreSQL is started for the run (fsync off, as the tests run it) unless `--pg` gives a
server URL. Ends with `RESULT files_<what>_mb_per_s <MB/s>` per measurement and
`RESULT files_upload_store_vs_disk_ratio`, `RESULT files_download_rows_vs_disk_ratio`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import orjson

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.lines import write_lines  # noqa: E402
from instruments.postgres import create_database, postgres  # noqa: E402
from offline_queue.batches import output_lines, write_files  # noqa: E402
from offline_queue.files import store_upload  # noqa: E402
from offline_queue.storage import StoreFile  # noqa: E402
from offline_queue.store import batches  # noqa: E402
from offline_queue.store.bulk import insert_ignoring_conflicts  # noqa: E402
from offline_queue.store.db import session  # noqa: E402
from offline_queue.store.files import Upload  # noqa: E402
from offline_queue.store.results import RESULT_COLUMNS, response_ids  # noqa: E402
from offline_queue.store.tables import Result  # noqa: E402
from offline_queue.submission import Submission  # noqa: E402
from offline_queue.validate import Limits  # noqa: E402

BLOCK = 1 << 20
MB = 1e6
ANSWER = orjson.dumps(
    {
        "id": "chatcmpl-0",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "smollm2",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "A fact about the sea. " * 8},
                "finish_reason": "length",
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 64, "total_tokens": 76},
    }
).decode()


def batch_file(path: Path, megabytes: int) -> Path:
    """A batch file of about `megabytes` MB of chat requests."""
    sample = write_lines(path, 1000)
    per_line = sample.stat().st_size / 1000
    return write_lines(path, max(1, int(megabytes * MB / per_line)))


async def blocks(path: Path) -> AsyncIterator[bytes]:
    with path.open("rb") as f:
        while block := f.read(BLOCK):
            yield block


def upload(db: str, path: Path, root: str | None) -> str:
    limits = Limits(max_file_bytes=8 << 30)
    row = asyncio.run(
        store_upload(blocks(path), limits, Upload("bench", path.name, "batch"), db=db, root=root)
    )  # fmt: skip
    return row.path


def read_all(open_stream: Callable[[], contextlib.AbstractContextManager]) -> int:
    n = 0
    with open_stream() as handle:
        while block := handle.read(BLOCK):
            n += len(block)
    return n


def fill_results(db: str, batch_id: str, lines: int) -> None:
    """`lines` result rows as settles leave them: 95 % answers, 5 % errors."""
    now = time.time()
    for start in range(0, lines, 20_000):
        n = min(20_000, lines - start)
        rows = []
        for line_no, rid in zip(range(start + 1, start + n + 1), response_ids(n), strict=True):
            ok = line_no % 20 != 0
            rows.append(
                (batch_id, line_no, f"req-{line_no}", rid, ok, 200 if ok else None,
                 ANSWER if ok else None, None if ok else "invalid_request",
                 None if ok else f"line {line_no}: body.max_tokens: must be positive",
                 12, 64 if ok else 0, 40.0, now, False, now)
            )  # fmt: skip
        with session(db) as s:
            insert_ignoring_conflicts(s.connection(), Result, RESULT_COLUMNS, rows)


def timed(call: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    result = call()
    return time.perf_counter() - t0, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upload-mb", type=int, default=200)
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pg", help="PostgreSQL server URL (default: start one)")
    parser.add_argument("--quick", action="store_true", help="20 MB, 50,000 lines, once")
    args = parser.parse_args()
    if args.quick:
        args.upload_mb, args.lines, args.repeats = 20, 50_000, 1
    with contextlib.ExitStack() as stack:
        server = args.pg or stack.enter_context(postgres()).url
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="oq-bench-files-")))
        db = create_database(server, f"files_{uuid.uuid4().hex[:10]}")
        source = batch_file(work / "in.jsonl", args.upload_mb)
        size = source.stat().st_size
        print(f"upload: {size / MB:.0f} MB; download: {args.lines:,} result lines; PostgreSQL")

        best: dict[str, float] = {}

        def keep(name: str, seconds: float, nbytes: int) -> None:
            rate = nbytes / MB / seconds
            best[name] = max(best.get(name, 0.0), rate)
            print(f"  {name:<22} {rate:8.1f} MB/s  ({seconds:.2f} s)")

        for _ in range(args.repeats):
            seconds, _ = timed(lambda: upload(db, source, None))
            keep("upload_store", seconds, size)
            seconds, _ = timed(lambda: upload(db, source, str(work / "uploads")))
            keep("upload_disk", seconds, size)
        stored = upload(db, source, None)
        stored_file = StoreFile(db, stored.removeprefix("store://"))
        for _ in range(args.repeats):
            seconds, _ = timed(lambda: read_all(stored_file.open_read))
            keep("read_store", seconds, size)
            seconds, _ = timed(lambda: read_all(lambda: source.open("rb")))
            keep("read_disk", seconds, size)

        batch_id = f"batch_bench_{uuid.uuid4().hex[:8]}"
        outputs = str(work / "out.jsonl"), str(work / "err.jsonl")
        batch, _ = batches.register_batch(db, Submission(batch_id, "bench", str(source), *outputs))
        t0 = time.perf_counter()
        fill_results(db, batch_id, args.lines)
        print(f"  (filled {args.lines:,} result rows in {time.perf_counter() - t0:.1f} s)")
        seconds, _ = timed(lambda: write_files(db, batch))
        out_size = (work / "out.jsonl").stat().st_size
        print(f"  write_files to disk: {seconds:.2f} s ({out_size / MB:.0f} MB of output)")
        for _ in range(args.repeats):
            seconds, n = timed(lambda: sum(map(len, output_lines(db, batch, "output"))))
            assert n == out_size
            keep("download_rows", seconds, out_size)
            seconds, _ = timed(lambda: read_all(lambda: (work / "out.jsonl").open("rb")))
            keep("download_disk", seconds, out_size)

        for name, rate in best.items():
            print(f"RESULT files_{name}_mb_per_s {rate:.1f}")
        for ours, disk in (("upload_store", "upload_disk"), ("download_rows", "download_disk")):
            print(f"RESULT files_{ours}_vs_disk_ratio {best[ours] / best[disk]:.3f}")


if __name__ == "__main__":
    main()
