"""What a /metrics scrape costs the store as its history grows: the time of one GET /metrics on
a metrics listener (the one `api serve --metrics-port` opens: every query a scrape runs, and the
text) against PostgreSQL holding N result rows of finished batches, with one batch in progress
beside them.

    .venv/bin/python bench/scrape.py [--results 10000,100000,1000000] [--batches 10] [--pg URL]

The rows are made by the store's own paths, no engine: a generated file queued by the ingest,
each chunk claimed and settled with an answer, then the batch finalized. Prometheus scrapes
every 15 s by default, so a scrape must stay far under a second at the largest history.
Ends with `RESULT scrape_ms_<N> <ms>` per size (best of 5) and `RESULT scrape_ms_growth
<ms at the largest ÷ ms at the smallest>` (1.0: the cost does not grow with the history).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from instruments.postgres import create_database, postgres  # noqa: E402
from offline_queue.engines.base import Reply  # noqa: E402
from offline_queue.findings import Accepted  # noqa: E402
from offline_queue.metrics import listener  # noqa: E402
from offline_queue.states import BatchStatus  # noqa: E402
from offline_queue.store import batches, claims, ingest  # noqa: E402
from offline_queue.submission import Submission  # noqa: E402

ANSWER = Reply(ok=True, body='{"ok":true}', prompt_tokens=20, completion_tokens=8, latency_ms=420.0)


def accepted(n: int) -> Iterator[Accepted]:
    for i in range(n):
        body = f'{{"model":"m","messages":[{{"role":"user","content":"q{i}"}}]}}'
        yield Accepted(
            line_no=i + 1,
            custom_id=f"r{i}",
            url="/v1/chat/completions",
            body_json=body,
            cache_digest=None,
        )


def add_batch(db: str, n: int, finish: bool) -> str:
    bid = f"batch_{uuid.uuid4().hex[:24]}"
    batches.register_batch(
        db, Submission(bid, uuid.uuid4().hex, f"/in/{bid}", f"/o/{bid}", f"/e/{bid}")
    )
    ingest.ingest(db, bid, accepted(n), group_size=20_000)
    ingest.finish_ingest(db, bid)
    batches.set_status(db, bid, BatchStatus.IN_PROGRESS, model_version="m@1")
    settle = n if finish else n // 2
    while settle > 0:
        claim = claims.claim(db, bid, "bench", min(settle, 20_000), lease_seconds=600)
        if claim is None:
            break
        claims.settle(db, bid, claim, [claims.Outcome(r, ANSWER) for r in claim.requests], 3)
        settle -= len(claim.requests)
    if finish:
        batches.set_status(db, bid, BatchStatus.COMPLETED)
    return bid


def scrape_ms(url: str, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        httpx.get(url, timeout=60).raise_for_status()
        best = min(best, time.perf_counter() - began)
    return best * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", default="10000,100000,1000000")
    ap.add_argument("--batches", type=int, default=10, help="finished batches per size step")
    ap.add_argument("--pg", help="a server URL; default: start one for the run")
    args = ap.parse_args()
    sizes = [int(x) for x in args.results.split(",")]
    with contextlib.ExitStack() as stack:
        server = args.pg or stack.enter_context(postgres()).url
        db = create_database(server, f"scrape_{uuid.uuid4().hex[:8]}")
        add_batch(db, 2_000, finish=False)  # one in progress, as a nightly run has
        url = f"http://127.0.0.1:{stack.enter_context(listener(db, '127.0.0.1', 0))}/metrics"
        have, figures = 0, {}
        for size in sizes:
            per_batch = max((size - have) // args.batches, 1)
            for _ in range(args.batches):
                add_batch(db, per_batch, finish=True)
            have += per_batch * args.batches
            figures[size] = scrape_ms(url)
            print(f"{have:>9} result rows: a scrape takes {figures[size]:.1f} ms", flush=True)
    for size, ms in figures.items():
        print(f"RESULT scrape_ms_{size} {ms:.1f}")
    print(f"RESULT scrape_ms_growth {figures[sizes[-1]] / figures[sizes[0]]:.2f}")


if __name__ == "__main__":
    main()
