"""A fault-injecting HTTP proxy in front of a real server, on loopback (a test instrument).

Each POST to a completions endpoint takes the next fault from a plan: pass it through, answer
500 or 429 (with Retry-After) itself, stall past the client's timeout, forward it and cut
the connection in the middle of the answer's body, or hold it until the test releases every
held request (a batch frozen mid-run, for as long as a test looks at it). It counts the bodies
it was sent, so a test can tell whether any request reached the engine twice.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections import Counter
from collections.abc import Callable

import httpx

Fault = str  # "pass" | "500" | "429" | "stall" | "reset" | "404" | "hold"


class FaultProxy:
    def __init__(self, upstream: str, plan: Callable[[int], Fault], stall_seconds: float = 30):
        self.upstream = upstream.rstrip("/")
        self.plan = plan
        self.stall_seconds = stall_seconds
        self.seen: Counter[str] = Counter()
        self.bodies: Counter[bytes] = Counter()
        """Each completions POST body, with how often it came."""
        self._counter = itertools.count()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.port = 0
        self._released: asyncio.Event | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    def release(self) -> None:
        """Forward every held request, and those the plan holds from now on, at once."""
        assert self._released is not None
        self._loop.call_soon_threadsafe(self._released.set)

    def __exit__(self, *_: object) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _close(self) -> None:
        """Connections still stalled end here, not as warnings when the loop is collected."""
        handlers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in handlers:
            t.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await self._client.aclose()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._client = httpx.AsyncClient(base_url=self.upstream, timeout=300)
        self._released = asyncio.Event()
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = dict(
                    (k.strip().lower(), v.strip())
                    for k, v in (x.split(":", 1) for x in lines[1:] if ":" in x)
                )
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                fault = "pass"
                if method == "POST" and path.endswith("completions"):
                    fault = self.plan(next(self._counter))
                    self.bodies[body] += 1
                self.seen[fault] += 1
                if not await self._answer(fault, method, path, headers, body, writer):
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except asyncio.CancelledError:
            # The proxy is closing (`_close`). Ended, not cancelled: Python 3.11.7's stream
            # server calls task.exception() on a cancelled handler, which logs a traceback
            # for every idle keep-alive connection.
            pass
        finally:
            writer.close()

    async def _answer(
        self,
        fault: Fault,
        method: str,
        path: str,
        headers: dict[str, str],
        body: bytes,
        writer: asyncio.StreamWriter,
    ) -> bool:
        if fault in ("500", "429", "404"):
            status = {
                "500": "500 Internal Server Error",
                "429": "429 Too Many Requests",
                "404": "404 Not Found",
            }[fault]
            payload = (
                b'{"error": {"message": "injected %s", "type": "injected", "code": null}}'
                % fault.encode()
            )
            extra = "Retry-After: 1\r\n" if fault == "429" else ""
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{extra}"
                f"Content-Length: {len(payload)}\r\n\r\n".encode()
                + payload
            )
            await writer.drain()
            return True
        if fault == "stall":
            await asyncio.sleep(self.stall_seconds)
            return False
        if fault == "hold":
            assert self._released is not None
            await self._released.wait()
        forward = {k: v for k, v in headers.items() if k in ("content-type", "authorization")}
        response = await self._client.request(method, path, content=body, headers=forward)
        payload = response.content
        head = (
            f"HTTP/1.1 {response.status_code} OK\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n"
        ).encode()
        if fault == "reset":  # half the body, then a hard close (RST)
            writer.write(head + payload[: len(payload) // 2])
            await writer.drain()
            writer.transport.abort()
            return False
        writer.write(head + payload)
        await writer.drain()
        return True


def cycle(*faults: Fault) -> Callable[[int], Fault]:
    """A plan that repeats `faults` in order."""
    return lambda n: faults[n % len(faults)]


def first(n_faulty: int, fault: Fault) -> Callable[[int], Fault]:
    return lambda n: fault if n < n_faulty else "pass"
