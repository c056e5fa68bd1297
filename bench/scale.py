"""Scale-out: 1, 2, 3 worker processes on one batch, one Prefect server, one PostgreSQL, each
worker with its own instant engine (bench/instant.py), so the store and the orchestration are
what is measured.

    .venv/bin/python bench/scale.py [--requests 200000] [--workers 1,2,3] [--chunk-size 4096]

The batch is registered and queued once up front; then N processes run the `batch-inference`
flow on the same file and share its claims (SKIP LOCKED). Throughput is counted from the first
committed chunk to the last, so process start-up is left out. Prints
`RESULT scale_ratio_<n> <throughput with n workers ÷ with 1>`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# The flow runs here and is served by a loop of this process, as `offline-queue run` does.
os.environ["OFFLINE_QUEUE_SERVE_HERE"] = "1"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from bench.lines import write_lines  # noqa: E402
from bench.plotting import PLOTS, pyplot  # noqa: E402
from instruments.postgres import create_database, postgres  # noqa: E402
from instruments.prefect_server import prefect_server  # noqa: E402
from instruments.processes import exit_on_sigterm  # noqa: E402

BLOCK = "instant-benchmark-engine/bench"


def worker(path: str, db: str, chunk_size: int) -> None:
    """One worker process: the flow on the shared batch, with the instant engine."""
    import bench.instant  # noqa: F401  (registers the block type in this process)
    from offline_queue.flows.batch import batch_inference

    batch_inference(input=path, db=db, engine=BLOCK, chunk_size=chunk_size)


def queue_batch(path: Path, db: str) -> str:
    """Register and queue the batch once, with the flow's own first two tasks."""
    from prefect import flow

    from offline_queue.flows.batch import submit, validate_and_queue
    from offline_queue.runs import BatchRun
    from offline_queue.states import Tier

    @flow(name="bench-queue-batch")
    def queue_only() -> str:
        s = submit(BatchRun(input=str(path), tier=Tier.BULK), db)
        validate_and_queue(db, s.batch_id, s.content_hash, s.created_at)
        return s.batch_id

    return queue_only()


def throughput(db: str, batch_id: str) -> float:
    """Requests per second from the first committed chunk to the last."""
    from sqlalchemy import func, select

    from offline_queue.store.db import session
    from offline_queue.store.tables import Result

    with session(db) as s:
        first, last = s.execute(
            select(func.min(Result.created_at), func.max(Result.created_at)).where(
                Result.batch_id == batch_id
            )
        ).one()
        after_first = s.scalar(
            select(func.count()).where(Result.batch_id == batch_id, Result.created_at > first)
        )
    return float(after_first or 0) / (last - first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--workers", default="1,2,3")
    parser.add_argument("--chunk-size", type=int, default=4096)
    parser.add_argument("--worker", nargs=2, metavar=("FILE", "DB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    exit_on_sigterm()
    if args.worker:
        worker(args.worker[0], args.worker[1], args.chunk_size)
        return

    rates: dict[int, float] = {}
    chunk = str(args.chunk_size)
    with (
        tempfile.TemporaryDirectory(prefix="oq-scale-") as tmp,
        postgres() as pg,
        prefect_server(Path(tmp) / "prefect") as env,
    ):
        os.environ["PREFECT_API_URL"] = env["PREFECT_API_URL"]
        from bench.instant import InstantBenchmarkEngine

        InstantBenchmarkEngine().save(BLOCK.split("/")[1], overwrite=True)
        for n in [int(x) for x in args.workers.split(",")]:
            db = create_database(pg.url, f"scale_{n}")
            path = write_lines(Path(tmp) / f"scale-{n}.jsonl", args.requests, f"scale{n}")
            batch_id = queue_batch(path, db)
            procs = [
                subprocess.Popen(
                    [sys.executable, __file__, "--worker", str(path), db, "--chunk-size", chunk],
                    env=env,
                    cwd=REPO,
                )
                for _ in range(n)
            ]
            for p in procs:
                assert p.wait(timeout=3600) == 0
            rates[n] = throughput(db, batch_id)
            print(f"{n} worker(s): {rates[n]:,.0f} req/s")
    base = rates[min(rates)]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar([str(n) for n in sorted(rates)], [rates[n] for n in sorted(rates)])
    ax.set_xlabel("worker processes on one batch")
    ax.set_ylabel("requests/s (instant engine)")
    ax.set_title(f"Scale-out, {args.requests:,} requests, PostgreSQL")
    fig.tight_layout()
    fig.savefig(PLOTS / "scale_out.png", dpi=120)
    for n, rate in sorted(rates.items()):
        print(f"RESULT scale_ratio_{n} {rate / base:.2f}")
    print(f"RESULT scale_req_per_s_1 {base:.0f}")


if __name__ == "__main__":
    main()
