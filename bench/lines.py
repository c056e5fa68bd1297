"""What the ingest benchmarks share: the chat request lines they generate, and a fresh process
that validates and queues a file the way the flow does, reporting its own peak RSS."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOPICS = ["the sea", "a city", "bread", "rain", "a bridge", "music", "a cat", "winter"]


def requests(n: int, tag: str, start: int = 0) -> list[dict]:
    """Chat requests numbered from `start`: distinct numbers make distinct prompts, so neither
    the result cache nor vLLM's prefix cache carries work from one measured run to the other."""
    return [
        {
            "custom_id": f"{tag}-{start + i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "smollm2",
                "messages": [
                    {
                        "role": "user",
                        "content": f"Write one sentence about {TOPICS[i % 8]}, #{start + i}.",
                    }
                ],
                "max_tokens": 32,
                "temperature": 0,
            },
        }
        for i in range(n)
    ]


def write_lines(path: Path, lines: int, tag: str = "line", first: int = 0) -> Path:
    """A batch file of `lines` chat requests numbered from `first`, written 10,000 at a time
    (the writer stays small)."""
    with path.open("w") as f:
        for start in range(0, lines, 10_000):
            for item in requests(min(10_000, lines - start), tag, first + start):
                f.write(json.dumps(item) + "\n")
    return path


# What `validate-and-queue` runs (flows/batch.py), in a process of its own.
INGEST_CHILD = """
import os, sys, time
from pathlib import Path
from sqlalchemy import text
from offline_queue.store import batches, ingest
from offline_queue.store.db import get_engine
from offline_queue.queue_file import queue_batch_file
from offline_queue.submission import Submission
from offline_queue.validate import Limits, inspect_file
path, db = Path(sys.argv[1]), sys.argv[2]

def server_cpu():  # CPU seconds of this database's PostgreSQL backends, when they are local
    if not db.startswith("postgresql"):
        return 0.0
    with get_engine(db).connect() as c:
        pids = c.execute(text("SELECT pid FROM pg_stat_activity "
                              "WHERE datname = current_database()")).scalars().all()
    return sum(backend_cpu(pid) for pid in pids)

def backend_cpu(pid):
    try:
        f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

batches.get_batch(db, "none")  # connect and migrate before the clock starts
t0 = time.perf_counter()
info = inspect_file(path, Limits())
placed = Submission("batch_ingest", info.content_hash, str(path), "o", "e")
batch, _ = batches.register_batch(db, placed)
cpu, server = time.process_time(), server_cpu()
t = time.perf_counter()
# What the ingest process of a large file runs (offline_queue/queue_file.py), here in this
# process so its CPU and peak are this process's own.
queue_batch_file(db, batch.id, own_process=False)
accepted, total = ingest.finish_ingest(db, batch.id)
seconds = time.perf_counter() - t
cpu, server = time.process_time() - cpu, server_cpu() - server
# VmHWM: this process's own peak (ru_maxrss can carry the parent's peak across exec).
peak_kb = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(accepted, total, t - t0, seconds, peak_kb, cpu, server)
"""


@dataclass
class IngestRun:
    accepted: int
    total: int
    inspect_seconds: float
    """submit's pass over the file: content hash, line count, whole-file refusals."""
    seconds: float
    """validate + queue + finish (the `validate-and-queue` task), store connected and migrated."""
    peak_rss_mb: float
    cpu_seconds: float
    """this process's CPU time during validate + queue + finish"""
    server_cpu_seconds: float
    """its PostgreSQL backends' CPU time meanwhile (0 on SQLite, NaN if the server is remote)"""


def run_ingest_child(path: Path, db: str) -> IngestRun:
    out = subprocess.run(
        [sys.executable, "-c", INGEST_CHILD, str(path), db],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    ).stdout.split()
    return IngestRun(
        int(out[0]),
        int(out[1]),
        float(out[2]),
        float(out[3]),
        int(out[4]) / 1024,
        float(out[5]),
        float(out[6]),
    )
