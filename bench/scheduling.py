"""How chunking and tiers behave on a shared `vllm serve`: chunk-size sweep, resume waste
after kill -9, and a critical batch's wait while bulk batches saturate the server.

    .venv/bin/python bench/scheduling.py [--only sweep,resume,priority]

One vLLM server (CPU build, bundled model), one PostgreSQL, one Prefect server, all on
loopback; workers are `offline-queue run` processes, as in production. Short requests
(max 4 tokens) so the orchestration, not the decoding, is what the figures show.

1. Sweep: the same batch at chunk sizes 64 … 4096, throughput ÷ a plain asyncio + httpx client
   at the same in-flight level (`RESULT sweep_ratio_<size>`), and the worst-case resume waste
   (one chunk) beside it; plot in bench/plots/chunk_sweep.png.
2. Resume: kill -9 the worker once 25/50/75 % of the batch has been sent to the server (so
   mid-chunk), run it again; requests the server saw beyond the batch's size were inferred
   twice (`RESULT resume_waste_<pct>`; ≤ one chunk).
3. Priority: two bulk batches fill the server; a critical batch arrives; seconds from its
   arrival to its first result against the bulk batches' chunk time
   (`RESULT priority_first_result_s`, `RESULT priority_wait_vs_bulk_chunk`).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
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
from instruments.processes import BIN, exit_on_sigterm, wait_for  # noqa: E402

SIZES = [64, 128, 256, 512, 1024, 2048, 4096]
MAX_TOKENS = 4


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
    return subprocess.Popen(
        [str(BIN / "offline-queue"), "run", str(path), "--db", db, "--engine", url, *extra],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )


def finished(p: subprocess.Popen, timeout: float = 1800) -> None:
    _, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err[-2000:]


def result_times(db: str, path: Path) -> list[float]:
    from sqlalchemy import select

    from offline_queue.store.db import session
    from offline_queue.store.tables import Batch, Result

    with session(db) as s:
        bid = s.scalar(select(Batch.id).where(Batch.input_path == str(path.resolve())))
        if bid is None:
            return []
        return sorted(s.scalars(select(Result.created_at).where(Result.batch_id == bid)).all())


@contextmanager
def services(work: Path) -> Iterator[tuple[str, str, dict]]:
    """(server /v1 URL, PostgreSQL base URL, env for workers)."""
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
    seconds, _ = asyncio.run(plain_client(url, short_items(n, "plain", 0), 32))
    plain_rate = n / seconds
    print(f"plain client, 32 in flight: {plain_rate:.1f} req/s")
    rates = {}
    for i, size in enumerate(SIZES):
        db = create_database(pg, f"sweep_{size}")
        path = short(work / f"sweep-{size}.jsonl", n, f"sweep{size}", (i + 1) * n)
        started = time.time()
        finished(run(path, db, url, env, "--chunk-size", str(size)))
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
    right.plot(SIZES, SIZES, "s--", color="tab:red", label="worst resume waste")
    right.set_ylabel("requests redone after kill -9 (≤ one chunk)")
    left.set_title(f"Chunk size on vllm serve ({n} requests, max {MAX_TOKENS} tokens)")
    fig.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(PLOTS / "chunk_sweep.png", dpi=120)


def resume(url: str, pg: str, env: dict, work: Path, n: int, chunk: int) -> None:
    for i, pct in enumerate((25, 50, 75)):
        db = create_database(pg, f"resume_{pct}")
        path = short(work / f"resume-{pct}.jsonl", n, f"resume{pct}", 100_000 * (i + 1))
        posts = [0]  # completions sent to the server (the proxy's `seen` counts GETs too)

        def count(_: int, posts: list[int] = posts) -> str:
            posts[0] += 1
            return "pass"

        with FaultProxy(url.removesuffix("/v1"), count) as proxy:
            first = run(path, db, proxy.url, env, "--chunk-size", str(chunk))
            # Killed by what was sent, not by what was committed: mid-chunk, the worst moment.
            target = n * pct // 100
            wait_for(
                lambda: first.poll() is not None or posts[0] >= target,  # noqa: B023
                timeout=900,
                interval=0.02,
            )
            if first.poll() is not None:
                _, err = first.communicate()
                raise RuntimeError(f"the worker ended before the kill: {err}")
            first.send_signal(signal.SIGKILL)
            first.wait()
            done_at_kill = len(result_times(db, path))
            finished(run(path, db, proxy.url, env, "--chunk-size", str(chunk)))
            sent = posts[0]
        assert len(result_times(db, path)) == n
        waste = sent - n
        print(f"kill -9 at {pct}% ({done_at_kill} done): {sent} sent for {n}, {waste} twice")
        print(f"RESULT resume_waste_{pct} {waste}")


def priority(url: str, pg: str, env: dict, work: Path) -> None:
    db = create_database(pg, "priority")
    bulk = [short(work / f"bulk-{i}.jsonl", 400, f"bulk{i}", 500_000 + 1000 * i) for i in (1, 2)]
    critical = short(work / "critical.jsonl", 8, "critical", 600_000)
    procs = [run(b, db, url, env, "--tier", "bulk", "--chunk-size", "32") for b in bulk]
    wait_for(lambda: len(result_times(db, bulk[0])) >= 96, timeout=900)
    crit = run(critical, db, url, env, "--tier", "critical", "--chunk-size", "8")
    from sqlalchemy import select

    from offline_queue.store.db import session
    from offline_queue.store.tables import Batch

    def registered() -> bool:
        with session(db) as s:
            where = Batch.input_path == str(critical.resolve())
            return bool(s.scalar(select(Batch.id).where(where)))

    wait_for(registered, timeout=300, interval=0.05)
    arrived = time.time()
    for p in (crit, *procs):
        finished(p)
    first = result_times(db, critical)[0] - arrived
    commits = sorted(set(result_times(db, bulk[0])))
    chunk_time = statistics.median(b - a for a, b in itertools.pairwise(commits))
    print(f"critical: first result {first:.1f} s after arrival; bulk chunk {chunk_time:.1f} s")
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
