"""Orchestration ceiling: requests/s through the whole flow when the engine costs nothing.

    .venv/bin/python bench/ceiling.py [--requests 1000000] [--chunk-size 32768] [--db URL | --pg]
                                      [--profile out.prof]

The `batch-inference` flow runs a generated batch on the benchmark-only instant engine
(bench/instant.py), so what is measured is ours: submit, validate + queue, claims, settles
and the two files. Prints where the time went by phase and
`RESULT ceiling_req_per_s <requests / (submit → last result persisted)>` and
`RESULT ceiling_end_to_end_req_per_s <requests / whole flow incl. the output files>`.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# The flow runs here and is served by a loop of this process, as `offline-queue run` does.
os.environ["OFFLINE_QUEUE_SERVE_HERE"] = "1"

import bench.quiet  # noqa: E402, F401  (before Prefect and vLLM)
from bench.instant import InstantBenchmarkEngine  # noqa: E402
from bench.lines import write_lines  # noqa: E402
from bench.plotting import PLOTS, pyplot  # noqa: E402
from instruments.postgres import postgres  # noqa: E402
from instruments.processes import exit_on_sigterm  # noqa: E402

BLOCK = "instant-benchmark-engine/bench"


def phases(db: str, batch_id: str) -> dict[str, float]:
    """When each phase ended, read from the store (epoch seconds)."""
    from sqlalchemy import func, select

    from offline_queue.store.db import session
    from offline_queue.store.tables import Batch, Result

    with session(db) as s:
        batch = s.get(Batch, batch_id)
        assert batch is not None
        first, last = s.execute(
            select(func.min(Result.created_at), func.max(Result.created_at)).where(
                Result.batch_id == batch_id
            )
        ).one()
        return {"created": float(batch.created_at), "first_result": first, "last_result": last}


def ceiling(n: int, chunk_size: int, db: str, work: Path, profile: str | None) -> dict:
    from offline_queue.flows.batch import batch_inference

    InstantBenchmarkEngine().save(BLOCK.split("/")[1], overwrite=True)
    warm = write_lines(work / "warm.jsonl", 1000, "warm", first=n)
    batch_inference(input=str(warm), db=db, engine=BLOCK, chunk_size=chunk_size)

    path = write_lines(work / "ceiling.jsonl", n, "ceiling")
    profiler = cProfile.Profile() if profile else None
    started = time.time()
    if profiler:
        profiler.enable()
    result = batch_inference(input=str(path), db=db, engine=BLOCK, chunk_size=chunk_size)
    if profiler is not None and profile is not None:
        profiler.disable()
        profiler.dump_stats(profile)
    ended = time.time()
    assert result["request_counts"] == {"total": n, "completed": n, "failed": 0}, result
    assert result["run"]["inferred"] == n, result["run"]
    at = phases(db, result["id"])
    persisted = at["last_result"] - started
    print(
        f"{n:,} requests, chunk {chunk_size}, store {db.split(':')[0]}:\n"
        f"  submit → first result  {at['first_result'] - started:6.1f} s  "
        f"(submit, validate + queue)\n"
        f"  first → last result    {at['last_result'] - at['first_result']:6.1f} s  "
        f"(claims, instant engine, settles)\n"
        f"  last result → end      {ended - at['last_result']:6.1f} s  (finalize: the two files)\n"
        f"  whole flow             {ended - started:6.1f} s"
    )
    spans = {
        "submit + validate + queue": at["first_result"] - started,
        "claims, engine, settles": at["last_result"] - at["first_result"],
        "finalize (two files)": ended - at["last_result"],
    }
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 2.4))
    left = 0.0
    for label, seconds in spans.items():
        ax.barh([0], [seconds], left=left, label=f"{label} {seconds:.1f} s")
        left += seconds
    ax.set_yticks([])
    ax.set_xlabel(f"seconds for {n:,} requests (instant engine, chunk {chunk_size})")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.45), ncol=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(PLOTS / "ceiling.png", dpi=120)
    return {"persisted_s": persisted, "total_s": ended - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--chunk-size", type=int, default=32768)
    parser.add_argument("--db", default=None, help="store URL (default: a fresh SQLite file)")
    parser.add_argument(
        "--pg", action="store_true", help="a PostgreSQL started for the run as the store"
    )
    parser.add_argument("--profile", default=None, help="write a cProfile of the run here")
    args = parser.parse_args()
    exit_on_sigterm()
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="oq-ceiling-")))
        db = args.db or f"sqlite:///{work / 'ceiling.db'}"
        if args.pg:
            db = stack.enter_context(postgres()).create_database("ceiling")
        t = ceiling(args.requests, args.chunk_size, db, work, args.profile)
    print(f"RESULT ceiling_req_per_s {args.requests / t['persisted_s']:.0f}")
    print(f"RESULT ceiling_end_to_end_req_per_s {args.requests / t['total_s']:.0f}")


if __name__ == "__main__":
    main()
