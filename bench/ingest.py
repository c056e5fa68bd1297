"""Ingest against PostgreSQL COPY: parse + validate + queue a batch file, and the memory it takes.

    .venv/bin/python bench/ingest.py [--sizes 10000,100000,1000000] [--repeats 3] [--pg URL]

For each size, a generated OpenAI Batch file of chat requests (bench/lines.py), measured on
both sides in this run, interleaved (ours, COPY, COPY, ours, ...; best of `--repeats`):

- ours: `queue_batch_file` + `finish_ingest` — what the `validate-and-queue` task runs (in
  the ingest process of its own, for a file this size) — in a fresh process per run, into a
  fresh PostgreSQL database (and once into SQLite for reference), with that process's peak RSS;
- baseline: psycopg `COPY` of the same rows (the columns our requests table gets) into a bare
  table with no index, key or constraint, fed from Python reading and parsing the same file;
- diagnostic: the same COPY into our migrated `requests` table, which splits the gap into what
  the queue's keys and partial index cost and what validation costs.

PostgreSQL is started for the run (fsync off, as the tests run it) unless `--pg` gives a
server URL (`postgresql+psycopg://user@host:port`; the user must be allowed to create
databases). Prints a table, writes bench/plots/ingest.png, and ends with
`RESULT ingest_vs_copy_ratio <ours lines/s ÷ COPY lines/s, largest size, PostgreSQL>`,
`RESULT queue_table_copy_vs_copy_ratio <the diagnostic ÷ COPY>` and
`RESULT ingest_peak_rss_mb_<size> <MB>` per size (the larger of the PostgreSQL and SQLite runs).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import psycopg

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.lines import IngestRun, run_ingest_child, write_lines  # noqa: E402
from bench.plotting import PLOTS, pyplot  # noqa: E402
from instruments.postgres import create_database, postgres  # noqa: E402
from offline_queue.store.db import get_engine  # noqa: E402

PLOT = PLOTS / "ingest.png"
COLUMNS = "batch_id, line_no, custom_id, url, body, cache_digest, state, attempts, not_before"
BARE_TABLE = """CREATE TABLE bare_requests (
    batch_id varchar(64), line_no integer, custom_id varchar(512), url varchar(64), body text,
    cache_digest varchar(64), state varchar(16), attempts integer, not_before double precision)"""


def new_database(server: str) -> str:
    """A fresh database on `server`; returns its SQLAlchemy URL."""
    return create_database(server, f"ingest_{uuid.uuid4().hex[:10]}")


def plain(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


@dataclass
class CopyRun:
    seconds: float
    cpu_seconds: float
    server_cpu_seconds: float


def backend_cpu(pid: int) -> float:
    """CPU seconds of a local PostgreSQL backend (NaN when the server is not on this host)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def copy_baseline(path: Path, server: str, queue_table: bool = False) -> CopyRun:
    """COPY the file's rows into a bare table: read, parse, one row per line, one commit.

    `queue_table`: into our migrated `requests` table instead — what its keys and the queue's
    partial index cost on their own, before any validation (a diagnostic, not the baseline)."""
    url = new_database(server)
    if queue_table:
        get_engine(url)  # migrated to head
    with psycopg.connect(plain(url)) as conn:
        if not queue_table:
            conn.execute(BARE_TABLE)
            conn.commit()
        pid = conn.info.backend_pid
        cpu, server_cpu = time.process_time(), backend_cpu(pid)
        started = time.perf_counter()
        table = "requests" if queue_table else "bare_requests"
        sql = f"COPY {table} ({COLUMNS}) FROM STDIN"
        with path.open("rb") as f, conn.cursor() as cur, cur.copy(sql) as copy:
            for line_no, raw in enumerate(f, 1):
                obj = orjson.loads(raw)
                body = orjson.dumps(obj["body"]).decode()
                row = ("batch_ingest", line_no, obj["custom_id"], obj["url"], body)
                copy.write_row((*row, None, "queued", 0, 0.0))
        conn.commit()
        seconds = time.perf_counter() - started
        return CopyRun(seconds, time.process_time() - cpu, backend_cpu(pid) - server_cpu)


@dataclass
class Size:
    lines: int
    mb: float
    pg: list[IngestRun] = field(default_factory=list)
    sqlite: list[IngestRun] = field(default_factory=list)
    copy: list[CopyRun] = field(default_factory=list)
    queue_copy: list[CopyRun] = field(default_factory=list)

    def best(self, runs: list[IngestRun]) -> float:
        return self.lines / min(r.seconds for r in runs)

    @property
    def copy_rate(self) -> float:
        return self.lines / min(r.seconds for r in self.copy)

    @property
    def queue_copy_rate(self) -> float:
        return self.lines / min(r.seconds for r in self.queue_copy)

    def cpu_us(self, runs: list[IngestRun] | list[CopyRun]) -> tuple[float, float]:
        """CPU µs per line (client, PostgreSQL backend), least of the runs: the work itself,
        whatever else shares the machine."""
        client = min(r.cpu_seconds for r in runs)
        server = min(r.server_cpu_seconds for r in runs)
        return client / self.lines * 1e6, server / self.lines * 1e6

    @property
    def peak_mb(self) -> float:
        return max(r.peak_rss_mb for r in self.pg + self.sqlite)


def measure(sizes: list[int], repeats: int, server: str, work: Path) -> list[Size]:
    out = []
    for lines in sizes:
        path = write_lines(work / f"ingest-{lines}.jsonl", lines)
        size = Size(lines, path.stat().st_size / 2**20)
        for rep in range(repeats):
            # Alternate the sides so whatever else runs on the machine hits both alike.
            for side in ("pg", "copy") if rep % 2 == 0 else ("copy", "pg"):
                if side == "copy":
                    size.copy.append(copy_baseline(path, server))
                else:
                    run = run_ingest_child(path, new_database(server))
                    assert run.accepted == run.total == lines, run
                    size.pg.append(run)
                print(
                    f"  {lines:>9,} lines  {side:<4} "
                    + (
                        f"{lines / size.copy[-1].seconds:>9,.0f} lines/s"
                        if side == "copy"
                        else f"{lines / size.pg[-1].seconds:>9,.0f} lines/s  "
                        f"peak RSS {size.pg[-1].peak_rss_mb:.0f} MB"
                    ),
                    flush=True,
                )
            size.queue_copy.append(copy_baseline(path, server, queue_table=True))
        run = run_ingest_child(path, f"sqlite:///{work / f'ingest-{lines}.db'}")
        assert run.accepted == run.total == lines, run
        size.sqlite.append(run)
        print(
            f"  {lines:>9,} lines  sqlite {lines / run.seconds:>7,.0f} lines/s  "
            f"peak RSS {run.peak_rss_mb:.0f} MB",
            flush=True,
        )
        path.unlink()
        out.append(size)
    return out


def report(sizes: list[Size]) -> None:
    print()
    print(
        "| lines | file MB | COPY lines/s | ours PG lines/s | ratio | ours SQLite lines/s "
        "| peak RSS PG / SQLite MB | CPU µs/line COPY (client + server) "
        "| CPU µs/line ours PG (client + server) "
        "| COPY into our `requests` table lines/s (÷ COPY) | its CPU µs/line |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in sizes:
        (cc, cs), (oc, os_), (qc, qs) = s.cpu_us(s.copy), s.cpu_us(s.pg), s.cpu_us(s.queue_copy)
        print(
            f"| {s.lines:,} | {s.mb:.0f} | {s.copy_rate:,.0f} | {s.best(s.pg):,.0f} "
            f"| {s.best(s.pg) / s.copy_rate:.3f} | {s.best(s.sqlite):,.0f} "
            f"| {max(r.peak_rss_mb for r in s.pg):.0f} / "
            f"{max(r.peak_rss_mb for r in s.sqlite):.0f} "
            f"| {cc:.1f} + {cs:.1f} | {oc:.1f} + {os_:.1f} "
            f"| {s.queue_copy_rate:,.0f} ({s.queue_copy_rate / s.copy_rate:.2f}) "
            f"| {qc:.1f} + {qs:.1f} |"
        )
    inspect = sizes[-1].pg[0].inspect_seconds
    print(
        f"(submit's hash + count pass over the {sizes[-1].lines:,}-line file, not in the "
        f"ratio: {inspect:.1f} s; {platform.machine()}, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f} at the end)"
    )


def plot(sizes: list[Size], path: Path) -> None:
    plt = pyplot()
    x = [s.lines for s in sizes]
    fig, (rss, rate) = plt.subplots(1, 2, figsize=(11, 4.2))
    rss.plot(x, [max(r.peak_rss_mb for r in s.pg) for s in sizes], "o-", label="PostgreSQL")
    rss.plot(x, [max(r.peak_rss_mb for r in s.sqlite) for s in sizes], "s--", label="SQLite")
    rss.axhline(300, color="red", lw=1, ls=":", label="target 300 MB")
    rss.set(xscale="log", xlabel="lines in the file", ylabel="peak RSS of the ingest (MB)")
    rss.set_ylim(0, 350)
    rss.set_title("Ingest memory")
    rss.legend()
    rate.plot(x, [s.copy_rate for s in sizes], "^-", label="COPY into a bare table (baseline)")
    rate.plot(x, [s.queue_copy_rate for s in sizes], "v:", label="COPY into our requests table")
    rate.plot(x, [s.best(s.pg) for s in sizes], "o-", label="ours, PostgreSQL")
    rate.plot(x, [s.best(s.sqlite) for s in sizes], "s--", label="ours, SQLite")
    for s in sizes:
        ratio = s.best(s.pg) / s.copy_rate
        rate.annotate(
            f"{ratio:.2f}×",
            (s.lines, s.best(s.pg)),
            xytext=(4, 6),
            fontsize=8,
            textcoords="offset points",
        )
    rate.set(xscale="log", yscale="log", xlabel="lines in the file", ylabel="lines/s (log)")
    rate.set_title("Parse + validate + queue vs COPY (ours ÷ COPY marked)")
    rate.legend()
    fig.suptitle(
        f"bench/ingest.py — {platform.machine()}, {os.cpu_count()} cores, PostgreSQL fsync=off",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pg", help="a PostgreSQL server URL; default: start one")
    parser.add_argument("--plot", type=Path, default=PLOT)
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    with contextlib.ExitStack() as stack:
        server = (args.pg or stack.enter_context(postgres()).url).rstrip("/")
        if server.startswith("postgresql://"):
            server = "postgresql+psycopg://" + server.removeprefix("postgresql://")
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="oq-bench-ingest-"))
        results = measure(sizes, args.repeats, server, Path(tmp))
    report(results)
    plot(results, args.plot)
    last = results[-1]
    print(f"RESULT ingest_vs_copy_ratio {last.best(last.pg) / last.copy_rate:.3f}")
    print(f"RESULT queue_table_copy_vs_copy_ratio {last.queue_copy_rate / last.copy_rate:.3f}")
    for s in results:
        print(f"RESULT ingest_peak_rss_mb_{s.lines} {s.peak_mb:.0f}")


if __name__ == "__main__":
    main()
