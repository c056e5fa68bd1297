"""How chunking and tiers behave when one serving loop feeds a shared `vllm serve`: chunk-size
sweep, resume waste after kill -9 of the loop, and a critical batch's wait while bulk batches
fill the server.

    .venv/bin/python bench/scheduling.py [--only sweep,resume,priority]

One vLLM server (CPU build, bundled model, priority scheduling), one PostgreSQL, one Prefect
server, all on loopback. As on a node: one `offline-queue worker loop --engine URL --db DB
--chunk-size N` claims the chunks of every batch on the server's route (up to 32 requests in
flight, the tier as each request's priority), and each batch is an `offline-queue run FILE
--engine URL --no-serve` process that only routes, queues, waits for the loop and finalizes.
Short requests (max 4 tokens) so the orchestration, not the decoding, is what the figures show.

1. Sweep: the same batch with the loop's chunk size at 64 … 4096, throughput (from the run's
   start to its last result) ÷ a plain asyncio + httpx client at the same in-flight level
   (`RESULT sweep_ratio_<size>`), beside the worst-case resume waste at that size (the chunks
   a loop holds: the one finishing and the next, ≤ 2 chunks); plot in
   bench/plots/chunk_sweep.png.
2. Resume: kill -9 the loop once 25/50/75 % of the batch has been sent to the server (so
   mid-chunk), start another loop (leases of 15 s: it claims the dead loop's chunks once they
   run out); requests the server saw beyond the batch's size were inferred twice
   (`RESULT resume_waste_<pct>`; ≤ the chunks the dead loop held, 2 × 64).
3. Priority: two bulk batches fill the loop (chunks of 32); a critical batch arrives; seconds
   from its arrival (its batch registered) to its first result, against a bulk chunk's time
   from its first request sent to its commit (`RESULT priority_first_result_s`,
   `RESULT priority_wait_vs_bulk_chunk`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from bench.lines import requests  # noqa: E402
from bench.plotting import PLOTS, pyplot  # noqa: E402
from bench.server import plain_client  # noqa: E402
from instruments.faultproxy import FaultProxy  # noqa: E402
from instruments.loopback import free_port  # noqa: E402
from instruments.postgres import create_database, postgres  # noqa: E402
from instruments.prefect_server import prefect_server  # noqa: E402
from instruments.processes import BIN, exit_on_sigterm, stop, wait_for  # noqa: E402

OQ = [str(BIN / "offline-queue")]
SIZES = [64, 128, 256, 512, 1024, 2048, 4096]
MAX_TOKENS = 4
IN_FLIGHT = 32
"""The loop's requests outstanding at the server (an engine URL's default max_in_flight)."""
RESUME_LEASE = 15
"""Lease seconds of the resume's loops: the second claims the dead one's chunks this late."""


def short_items(n: int, tag: str, first: int) -> list[dict]:
    """`n` chat requests of MAX_TOKENS tokens, prompts distinct from every other batch's."""
    items = requests(n, tag, first)
    for item in items:
        item["body"]["max_tokens"] = MAX_TOKENS
    return items


def short(path: Path, n: int, tag: str, first: int) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in short_items(n, tag, first)))
    return path


def run(path: Path, db: str, url: str, env: dict, *extra: str) -> subprocess.Popen:
    """The batch's flow in a process of its own (output in FILE.log); the loop serves it."""
    with path.with_suffix(".log").open("wb") as log:
        return subprocess.Popen(
            [*OQ, "run", str(path), "--db", db, "--engine", url, "--no-serve", *extra],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )


def start_loop(
    url: str, db: str, env: dict, log: Path, chunk: int, *extra: str
) -> subprocess.Popen:
    """`offline-queue worker loop` on the server at `url`, serving the batches of `db`."""
    cmd = [*OQ, "worker", "loop", "--engine", url, "--db", db, "--chunk-size", str(chunk)]
    with log.open("ab") as out:
        return subprocess.Popen(
            [*cmd, *extra],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )


@contextmanager
def serving(url: str, db: str, env: dict, log: Path, chunk: int) -> Iterator[subprocess.Popen]:
    """A loop, yielded once its row is in the store (it claims within POLL_SECONDS)."""
    from offline_queue.store import loops

    loop = start_loop(url, db, env, log, chunk)
    try:
        wait_for(lambda: loop.poll() is not None or loops.live_loops(db), 120, 0.2)
        assert loop.poll() is None, log.read_text()[-2000:]
        yield loop
    finally:
        stop(loop)


def finished(
    p: subprocess.Popen, path: Path, loop: subprocess.Popen, log: Path, timeout: float = 1800
) -> None:
    """The run of `path` ended well; raises at once (the run stopped) if the loop serving it
    (its output in `log`) died."""
    try:
        wait_for(lambda: p.poll() is not None or loop.poll() is not None, timeout, 0.2)
        assert loop.poll() is None, f"the loop died: {log.read_text()[-2000:]}"
    finally:
        stop(p)
    assert p.returncode == 0, path.with_suffix(".log").read_text()[-2000:]


def batch_id(db: str, path: Path) -> str | None:
    from sqlalchemy import select

    from offline_queue.store.db import session
    from offline_queue.store.tables import Batch

    with session(db) as s:
        return s.scalar(select(Batch.id).where(Batch.input_path == str(path.resolve())))


def result_times(db: str, path: Path) -> list[float]:
    from sqlalchemy import select

    from offline_queue.store.db import session
    from offline_queue.store.tables import Result

    bid = batch_id(db, path)
    if bid is None:
        return []
    with session(db) as s:
        return sorted(s.scalars(select(Result.created_at).where(Result.batch_id == bid)).all())


def chunk_seconds(db: str, paths: list[Path]) -> list[float]:
    """Each chunk of these batches (its rows share a commit time): from its first request sent
    to the server (finished_at - latency) to its commit."""
    from sqlalchemy import func, select

    from offline_queue.store.db import session
    from offline_queue.store.tables import Result

    ids = [batch_id(db, p) for p in paths]
    sent = func.min(Result.finished_at - Result.latency_ms / 1000.0)
    with session(db) as s:
        rows = s.execute(
            select(Result.created_at, sent)
            .where(Result.batch_id.in_(ids))
            .group_by(Result.batch_id, Result.created_at)
        ).all()
    return [commit - first for commit, first in rows]


@contextmanager
def services(work: Path) -> Iterator[tuple[str, str, dict]]:
    """(server /v1 URL, PostgreSQL base URL, env for runs and loops)."""
    from offline_queue.engines.vllm_server import ServerProcess, server_args
    from offline_queue.model import prepare_bundled_model

    with ExitStack() as stack:
        pg = stack.enter_context(postgres())
        env = stack.enter_context(prefect_server(work / "prefect"))
        port = free_port()
        log = stack.enter_context((work / "serve.log").open("wb"))
        args = server_args(prepare_bundled_model(), "127.0.0.1", port, "smollm2")
        server = stack.enter_context(ServerProcess(args, "127.0.0.1", port, log))
        server.wait_ready()
        yield f"http://127.0.0.1:{port}/v1", pg.url, env


def sweep(url: str, pg: str, env: dict, work: Path, n: int) -> None:
    seconds, _ = asyncio.run(plain_client(url, short_items(n, "plain", 0), IN_FLIGHT))
    plain_rate = n / seconds
    print(f"plain client, {IN_FLIGHT} in flight: {plain_rate:.1f} req/s")
    rates = {}
    for i, size in enumerate(SIZES):
        db = create_database(pg, f"sweep_{size}")
        path = short(work / f"sweep-{size}.jsonl", n, f"sweep{size}", (i + 1) * n)
        log = work / f"loop-sweep-{size}.log"
        with serving(url, db, env, log, size) as loop:
            started = time.time()
            finished(run(path, db, url, env), path, loop, log)
        times = result_times(db, path)
        rates[size] = n / (times[-1] - started)
        print(f"chunk {size:5d}: {rates[size]:6.1f} req/s  ratio {rates[size] / plain_rate:.3f}")
        print(f"RESULT sweep_ratio_{size} {rates[size] / plain_rate:.3f}")

    plt = pyplot()
    fig, left = plt.subplots(figsize=(7, 4))
    left.plot(SIZES, [rates[s] / plain_rate for s in SIZES], "o-", label="throughput ÷ plain")
    left.set_xscale("log", base=2)
    left.set_xlabel("chunk size (requests)")
    left.set_ylabel("throughput ÷ plain httpx client")
    right = left.twinx()
    worst = [min(2 * s, n) for s in SIZES]
    right.plot(SIZES, worst, "s--", color="tab:red", label="worst resume waste")
    right.set_ylabel("requests redone after kill -9 (≤ 2 chunks)")
    left.set_title(f"Loop chunk size on vllm serve ({n} requests, max {MAX_TOKENS} tokens)")
    fig.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(PLOTS / "chunk_sweep.png", dpi=120)


def resume(url: str, pg: str, env: dict, work: Path, n: int, chunk: int) -> None:
    lease = ("--lease-seconds", str(RESUME_LEASE))
    for i, pct in enumerate((25, 50, 75)):
        db = create_database(pg, f"resume_{pct}")
        path = short(work / f"resume-{pct}.jsonl", n, f"resume{pct}", 100_000 * (i + 1))
        log = work / f"loop-resume-{pct}.log"
        posts = [0]  # completions sent to the server (the proxy's `seen` counts GETs too)

        def count(_: int, posts: list[int] = posts) -> str:
            posts[0] += 1
            return "pass"

        with FaultProxy(url.removesuffix("/v1"), count) as proxy:
            first = start_loop(proxy.url, db, env, log, chunk, *lease)
            batch = run(path, db, proxy.url, env)
            try:
                # Killed by what was sent, not by what was committed: mid-chunk, the worst moment.
                target = n * pct // 100
                wait_for(
                    lambda: first.poll() is not None or posts[0] >= target,  # noqa: B023
                    timeout=900,
                    interval=0.02,
                )
                if first.poll() is not None:
                    raise RuntimeError(f"the loop ended before the kill: {log.read_text()[-2000:]}")
                first.send_signal(signal.SIGKILL)
                first.wait()
                killed = time.time()
                done_at_kill = len(result_times(db, path))
                second = start_loop(proxy.url, db, env, log, chunk, *lease)
                try:
                    finished(batch, path, second, log)
                finally:
                    stop(second)
            finally:
                stop(first, batch)
            sent = posts[0]
        assert len(result_times(db, path)) == n
        waste = sent - n
        print(
            f"kill -9 of the loop at {pct}% sent ({done_at_kill} committed): {sent} sent for "
            f"{n}, {waste} twice; done {time.time() - killed:.0f} s after the kill"
        )
        print(f"RESULT resume_waste_{pct} {waste}")


def priority(url: str, pg: str, env: dict, work: Path) -> None:
    db = create_database(pg, "priority")
    bulk = [short(work / f"bulk-{i}.jsonl", 400, f"bulk{i}", 500_000 + 1000 * i) for i in (1, 2)]
    critical = short(work / "critical.jsonl", 8, "critical", 600_000)
    log = work / "loop-priority.log"
    with serving(url, db, env, log, 32) as loop:
        procs = {b: run(b, db, url, env, "--tier", "bulk") for b in bulk}
        try:
            wait_for(lambda: len(result_times(db, bulk[0])) >= 96, timeout=900)
            procs[critical] = run(critical, db, url, env, "--tier", "critical")
            wait_for(lambda: batch_id(db, critical), timeout=300, interval=0.05)
            arrived = time.time()
            for path in (critical, *bulk):
                finished(procs[path], path, loop, log)
        finally:
            stop(*procs.values())
    first = result_times(db, critical)[0] - arrived
    chunk_time = statistics.median(chunk_seconds(db, bulk))
    bulk_end = max(result_times(db, bulk[0])[-1], result_times(db, bulk[1])[-1])
    print(
        f"critical: first result {first:.1f} s after arrival; a bulk chunk {chunk_time:.1f} s "
        f"from its first request sent to its commit; bulk done {bulk_end - arrived:.0f} s "
        "after the critical arrival"
    )
    print(f"RESULT priority_first_result_s {first:.2f}")
    print(f"RESULT priority_wait_vs_bulk_chunk {first / chunk_time:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", default="sweep,resume,priority")
    parser.add_argument("--sweep-requests", type=int, default=2048)
    parser.add_argument("--resume-requests", type=int, default=512)
    parser.add_argument("--resume-chunk", type=int, default=64)
    args = parser.parse_args()
    exit_on_sigterm()
    only = set(args.only.split(","))
    with tempfile.TemporaryDirectory(prefix="oq-sched-") as tmp:
        work = Path(tmp)
        with services(work) as (url, pg, env):
            asyncio.run(plain_client(url, short_items(8, "warm", 9_000_000), 8))
            if "priority" in only:
                priority(url, pg, env, work)
            if "resume" in only:
                resume(url, pg, env, work, args.resume_requests, args.resume_chunk)
            if "sweep" in only:
                sweep(url, pg, env, work, args.sweep_requests)


if __name__ == "__main__":
    main()
