"""The adaptive in-flight window against the fixed 32, on `vllm serve`, clean and behind the
fault proxy answering 429 (Retry-After: 1) to a share of requests.

    .venv/bin/python bench/adaptive.py [--requests 128] [--share 0.1] [--seed 7]

One `vllm serve` on loopback; the server engine (offline_queue/engines/openai_http.py, the code
a chunk runs) sends the same kind of chat requests (max 32 tokens, temperature 0) with
`max_in_flight=32`, once not adaptive (the fixed 32: the knee bench/server.py measured) and once
adaptive (window.py: AIMD under the cap of 32). Every run goes through the fault proxy, so the
proxy's own cost is on both sides; in the 429 runs its seeded plan refuses the same POSTs (by
their order) on both sides. Each run has prompts of its own, so no cache carries work over.

RESULT lines: `adaptive_vs_fixed32` and `adaptive_vs_fixed32_429` (output tokens/s, adaptive
÷ fixed: above 1 the window wins), `retries_<run>` (429s answered, each one retry),
`failed_<run>` (requests that ran out of attempts), and `window_mean_<run>` (the adaptive
window's time-weighted mean size).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

from bench.lines import requests  # noqa: E402
from bench.server import bundled_server, plain_client  # noqa: E402
from instruments.faultproxy import Fault, FaultProxy  # noqa: E402
from instruments.loopback import free_port  # noqa: E402


@dataclass
class Run:
    name: str
    seconds: float
    tokens: int
    retries: int
    failed: int
    window_mean: float | None

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds


def refusing(share: float, seed: int) -> Callable[[int], Fault]:
    """429 to `share` of the POSTs, drawn per POST number: the same ones in every run."""
    return lambda n: "429" if random.Random(seed * 1_000_003 + n).random() < share else "pass"


def time_weighted_mean(history: list[tuple[float, int, str]], end: float) -> float:
    """The window's mean size over the run, each size weighted by how long it held."""
    total = weighted = 0.0
    for (at, size, _), (nxt, _, _) in zip(history, [*history[1:], (end, 0, "")], strict=True):
        weighted += size * (nxt - at)
        total += nxt - at
    return weighted / total if total else float(history[-1][1])


def one_run(
    name: str, server: str, adaptive: bool, plan: Callable[[int], Fault], items: list[dict]
) -> Run:
    from offline_queue.engines.base import EngineRequest
    from offline_queue.engines.openai_http import HttpEngine, ServerSettings

    with FaultProxy(server, plan) as proxy:
        # A fresh engine, not the process's shared one: each run starts its own window.
        engine = HttpEngine(ServerSettings(base_url=proxy.url, max_in_flight=32, adaptive=adaptive))
        batch = [
            EngineRequest(line_no=i, url=x["url"], body_json=json.dumps(x["body"]))
            for i, x in enumerate(items)
        ]
        started = time.perf_counter()
        replies = engine.infer(batch)
        seconds = time.perf_counter() - started
        ended = time.monotonic()
        retries = proxy.seen["429"]
    window = engine.window
    run = Run(
        name,
        seconds,
        sum(r.completion_tokens for r in replies if r.ok),
        retries,
        sum(not r.ok for r in replies),
        time_weighted_mean(window.history, ended) if window else None,
    )
    mean = f", window mean {run.window_mean:.1f}" if run.window_mean is not None else ""
    print(
        f"{name:16s}: {seconds:7.2f} s  {run.tokens} output tokens  {run.rate:6.1f} tok/s  "
        f"{retries} retries  {run.failed} failed{mean}",
        flush=True,
    )
    if window:
        print(f"  window: {[size for _, size, _ in window.history][:40]}", flush=True)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--share", type=float, default=0.1, help="Share of POSTs answered 429.")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    port = free_port()
    n = args.requests
    clean: Callable[[int], Fault] = lambda _n: "pass"  # noqa: E731
    refused = refusing(args.share, args.seed)
    with tempfile.TemporaryDirectory(prefix="oq-bench-") as tmp:
        log = (Path(tmp) / "serve.log").open("wb")
        with bundled_server(port, log) as server:
            url = f"http://127.0.0.1:{port}/v1"
            asyncio.run(plain_client(url, requests(32, "warm", 50 * n), 32))  # warm the server
            plans = (
                ("fixed32", False, clean),
                ("adaptive", True, clean),
                ("adaptive_429", True, refused),
                ("fixed32_429", False, refused),
            )
            runs = {
                name: one_run(name, server.base_url, adaptive, plan, requests(n, name, k * n))
                for k, (name, adaptive, plan) in enumerate(plans)
            }
    print(f"({n} requests per run, max_in_flight 32, {args.share:.0%} answered 429)")
    print(f"RESULT adaptive_vs_fixed32 {runs['adaptive'].rate / runs['fixed32'].rate:.3f}")
    print(
        f"RESULT adaptive_vs_fixed32_429 {runs['adaptive_429'].rate / runs['fixed32_429'].rate:.3f}"
    )
    for run in runs.values():
        print(f"RESULT retries_{run.name} {run.retries}")
        print(f"RESULT failed_{run.name} {run.failed}")
        if run.window_mean is not None:
            print(f"RESULT window_mean_{run.name} {run.window_mean:.1f}")


if __name__ == "__main__":
    main()
