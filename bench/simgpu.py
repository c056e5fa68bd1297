"""BENCHMARK INSTRUMENT — a simulated GPU node's engine: an OpenAI-compatible HTTP server whose
throughput follows continuous batching, with no model and almost no CPU.

    python -m bench.simgpu --port 8000 [--side /run/.../engine.sock]

It exists so bench/cluster.py can ask whether N engines are kept busy, on a machine with no GPU
and two cores. It lives under bench/ on purpose: no product module imports it, no block names
it, and its answers say what it is (model `simulated-gpu`).

The model of a GPU: requests join a running batch of at most `max_num_seqs` (the rest wait,
by the request's `priority`, lower first, as vLLM's priority scheduling that `engine serve`
turns on orders them — then first come first served); each engine step produces one token for
every running request and takes `step_base + step_per_seq × running` seconds; a request leaves
after its `max_tokens` steps. So throughput grows with the requests in flight up to
`max_num_seqs` and is flat after (the knee bench/server.py measured on the real `vllm serve`).
The defaults give 25 req/s at 64 in flight for 16-token answers (the published H100
Llama-3-8B 256-in/256-out figure, in requests per second): 64 / (16 × (40 + 1.875 × 64) ms).
Steps are scheduled on the wall clock, not after each wake-up, so a CPU-starved process
catches up instead of being a slower GPU.

A side endpoint on a Unix socket (`--side`, in a directory the host sees: the node's own
127.0.0.1 is unreachable from outside its network namespace) serves what the benchmark reads:
`GET /stats` (in flight now, completed, the latest request's arrival) and `GET /timeline` (every
request's arrival and completion times), so the engine's idle time is measured where it is.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import os
import signal
import time
from dataclasses import dataclass, field

import orjson

MODEL = "simulated-gpu"


@dataclass
class Seq:
    tokens_left: int
    tokens: int
    priority: int
    done: asyncio.Future[None]


@dataclass
class Gpu:
    """The continuous-batching scheduler and its timeline."""

    max_num_seqs: int = 64
    step_base: float = 0.040
    step_per_seq: float = 0.001875
    running: list[Seq] = field(default_factory=list)
    waiting: list[Seq] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)
    completions: list[float] = field(default_factory=list)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def in_flight(self) -> int:
        return len(self.running) + len(self.waiting)

    async def generate(self, tokens: int, priority: int = 0) -> None:
        self.arrivals.append(time.time())
        seq = Seq(tokens, tokens, priority, asyncio.get_running_loop().create_future())
        bisect.insort(self.waiting, seq, key=lambda s: s.priority)  # after its equals
        self._wake.set()
        try:
            await seq.done
        finally:
            self.completions.append(time.time())

    async def run(self) -> None:
        next_step = time.monotonic()
        while True:
            if not self.running and not self.waiting:
                self._wake.clear()
                await self._wake.wait()
                next_step = time.monotonic()
            room = self.max_num_seqs - len(self.running)
            self.running += self.waiting[:room]
            del self.waiting[:room]
            next_step += self.step_base + self.step_per_seq * len(self.running)
            delay = next_step - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            still = []
            for seq in self.running:
                seq.tokens_left -= 1
                if seq.tokens_left > 0:
                    still.append(seq)
                elif not seq.done.done():
                    seq.done.set_result(None)
            self.running = still


def _chat(n: int, tokens: int) -> bytes:
    return orjson.dumps(
        {
            "id": f"chatcmpl-sim{n}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "simulated"},
                    "finish_reason": "length",
                }
            ],
            "usage": {
                "prompt_tokens": 16,
                "completion_tokens": tokens,
                "total_tokens": 16 + tokens,
            },
        }
    )


class Server:
    """HTTP/1.1 with keep-alive, by hand: a framework would cost more CPU than the engine."""

    def __init__(self, gpu: Gpu, default_tokens: int):
        self.gpu, self.default_tokens = gpu, default_tokens
        self.count = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request_line, *header_lines = head.decode("latin-1").split("\r\n")
                method, path, _ = request_line.split(" ", 2)
                length = 0
                for h in header_lines:
                    name, _, value = h.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                body = await reader.readexactly(length) if length else b""
                status, payload = await self.route(method, path, body)
                writer.write(
                    b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n"
                    % (status, b"OK" if status == 200 else b"Error", len(payload))
                    + payload
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        except asyncio.CancelledError:  # shutting down with requests in flight
            pass
        finally:
            writer.close()

    async def route(self, method: str, path: str, body: bytes) -> tuple[int, bytes]:
        if method == "POST" and path.endswith("/chat/completions"):
            try:
                request = orjson.loads(body)
                tokens = int(request.get("max_tokens") or self.default_tokens)
                priority = int(request.get("priority") or 0)
            except (orjson.JSONDecodeError, AttributeError, ValueError, TypeError):
                return 400, b'{"error":{"message":"bad body","type":"invalid_request_error"}}'
            tokens = max(1, tokens)
            await self.gpu.generate(tokens, priority)
            self.count += 1
            return 200, _chat(self.count, tokens)
        if path.endswith("/models"):
            data = [{"id": MODEL, "object": "model", "root": MODEL, "owned_by": "bench"}]
            return 200, orjson.dumps({"object": "list", "data": data})
        if path == "/health":
            return 200, b"{}"
        if path == "/stats":
            g = self.gpu
            last = g.arrivals[-1] if g.arrivals else None
            stats = {"in_flight": g.in_flight, "completed": len(g.completions), "last": last}
            return 200, orjson.dumps(stats)
        if path == "/timeline":
            return 200, orjson.dumps(
                {"arrivals": self.gpu.arrivals, "completions": self.gpu.completions}
            )
        return 404, b'{"error":{"message":"not found","type":"invalid_request_error"}}'


async def serve(args: argparse.Namespace) -> None:
    gpu = Gpu(args.max_num_seqs, args.step_base_ms / 1000, args.step_per_seq_ms / 1000)
    server = Server(gpu, args.default_tokens)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    listeners = [await asyncio.start_server(server.handle, "127.0.0.1", args.port, backlog=1024)]
    if args.side:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(args.side)
        listeners.append(await asyncio.start_unix_server(server.handle, path=args.side))
        os.chmod(args.side, 0o666)
    scheduler = asyncio.create_task(gpu.run())
    print("ready", flush=True)
    await stop.wait()
    scheduler.cancel()
    for listener in listeners:
        listener.close()


def rate(in_flight: int, tokens: int = 16, args: argparse.Namespace | None = None) -> float:
    """The model's steady throughput (req/s) at `in_flight` requests outstanding."""
    a = args or parser().parse_args([])
    running = min(in_flight, a.max_num_seqs)
    step = a.step_base_ms / 1000 + a.step_per_seq_ms / 1000 * running
    return running / (tokens * step)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--side", help="Unix socket for /stats and /timeline")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--step-base-ms", type=float, default=40.0)
    p.add_argument("--step-per-seq-ms", type=float, default=1.875)
    p.add_argument("--default-tokens", type=int, default=16)
    return p


if __name__ == "__main__":
    asyncio.run(serve(parser().parse_args()))
