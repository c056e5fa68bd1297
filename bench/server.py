"""The server engine against a plain async client, on the same `vllm serve`.

    .venv/bin/python bench/server.py [--requests 512] [--sweep 4,8,16,32,64]

1. Sweep: a plain asyncio + httpx client at several in-flight levels, to find where the
   server's throughput stops growing (`RESULT knee_in_flight <n>`).
2. The same kind of requests (chat, max 32 tokens, temperature 0) through (a) the plain client
   at the best level found and (b) the `batch-inference` flow with the OpenAIServer engine at
   that level, served by one serving loop in this process (a node's loop, as
   `offline-queue worker loop` runs it): `RESULT server_overhead_ratio <b / a>` (seconds per
   output token).
Each measured run has prompts of its own, so no cache carries work between them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import bench.quiet  # noqa: E402, F401  (before Prefect and vLLM)
from bench.overhead import compare, requests, write_jsonl  # noqa: E402
from instruments.loopback import free_port  # noqa: E402

if TYPE_CHECKING:
    from offline_queue.engines.vllm_server import ServerProcess


async def plain_client(url: str, items: list[dict], in_flight: int) -> tuple[float, int]:
    """The baseline: as simple as a good client gets. Returns (seconds, output tokens)."""
    slots = asyncio.Semaphore(in_flight)
    tokens = 0
    async with httpx.AsyncClient(
        base_url=url, timeout=600, limits=httpx.Limits(max_connections=in_flight)
    ) as client:

        async def one(item: dict) -> None:
            nonlocal tokens
            async with slots:
                body = {**item["body"], "model": "smollm2"}
                response = await client.post("/chat/completions", json=body)
                response.raise_for_status()
                tokens += response.json()["usage"]["completion_tokens"]

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in items))
        return time.perf_counter() - started, tokens


@contextlib.contextmanager
def bundled_server(port: int, log: IO[bytes]) -> Iterator[ServerProcess]:
    """`vllm serve` of the bundled model on 127.0.0.1:`port`, ready, its output to `log`."""
    from offline_queue.engines.vllm_server import ServerProcess, server_args
    from offline_queue.model import prepare_bundled_model

    args = server_args(prepare_bundled_model(), "127.0.0.1", port, "smollm2")
    with ServerProcess(args, "127.0.0.1", port, log) as server:
        server.wait_ready()
        yield server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--sweep", default="4,8,16,32,64")
    parser.add_argument("--sweep-requests", type=int, default=96)
    parser.add_argument("--chunk-size", type=int, default=256)
    args = parser.parse_args()

    from offline_queue.blocks.engines import OpenAIServer, route_of
    from offline_queue.flows.batch import batch_inference
    from offline_queue.loop import ServingLoop

    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    n = args.requests
    with tempfile.TemporaryDirectory(prefix="oq-bench-") as tmp:
        work = Path(tmp)
        log = (work / "serve.log").open("wb")
        with bundled_server(port, log):
            asyncio.run(plain_client(url, requests(8, "warm", 50 * n), 8))  # warm the server

            best, best_rate, offset = 0, 0.0, 10 * n
            for level in [int(x) for x in args.sweep.split(",")]:
                items = requests(args.sweep_requests, "sweep", offset)
                offset += args.sweep_requests
                seconds, tokens = asyncio.run(plain_client(url, items, level))
                rate = tokens / seconds
                print(f"in flight {level:3d}: {rate:6.1f} output tok/s")
                if rate > best_rate * 1.05:  # the knee: the last level that still adds > 5 %
                    best, best_rate = level, rate
            print(f"RESULT knee_in_flight {best}")

            seconds_a, tokens_a = asyncio.run(plain_client(url, requests(n, "plain", 0), best))
            db = f"sqlite:///{work / 'bench.db'}"
            block = OpenAIServer(base_url=url, max_in_flight=best)
            block.save("bench-server", overwrite=True)
            engine = "openai-server/bench-server"
            loop = ServingLoop(db, block.engine(), route_of(engine), chunk_size=args.chunk_size)
            loop.start()  # the flow only queues and waits: the loop serves
            try:
                warm = write_jsonl(work / "warm.jsonl", requests(8, "warmflow", 60 * n))
                batch_inference(input=str(warm), db=db, engine=engine)
                path = write_jsonl(work / "bench.jsonl", requests(n, "flow", n))
                started = time.perf_counter()
                result = batch_inference(input=str(path), db=db, engine=engine)
                seconds_b = time.perf_counter() - started
            finally:
                loop.stop()
            assert result["run"]["inferred"] == n, result["run"]
            tokens_b = result["usage"]["output_tokens"]
    print(f"(in flight {best}, chunk_size {args.chunk_size}, {n} requests)")
    ratio = compare(
        "server_overhead_ratio",
        ("plain httpx client", seconds_a, tokens_a),
        ("offline-queue flow", seconds_b, tokens_b),
    )
    print(json.dumps({"knee_in_flight": best, "server_overhead_ratio": round(ratio, 3)}))


if __name__ == "__main__":
    main()
