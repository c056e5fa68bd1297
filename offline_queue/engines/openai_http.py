"""Any OpenAI-compatible server (first of all `vllm serve`) over httpx: one event loop thread and
one connection pool per process and server, shared by every chunk the process runs, with up to
`max_in_flight` requests outstanding so the server's continuous batching stays full. A free slot
goes to the most urgent waiting request, which carries its tier to the server as `priority` too:
a critical chunk overtakes bulk ones without killing anything (docs/scheduling.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import email.utils
import heapq
import ipaddress
import itertools
import math
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson

from offline_queue.engines.base import EngineRequest, Overlap, PerProcess, Reply
from offline_queue.model import model_version as folder_version
from offline_queue.retry import RetryPolicy
from offline_queue.window import Window

RETRIABLE_STATUS = frozenset({429, 500, 502, 503, 504})
OVERLOAD_STATUS = frozenset({429, 503})
"""Answers that say the server is past its knee: the window halves (window.py)."""


@dataclass(frozen=True)
class ServerSettings:
    base_url: str
    """Up to and including /v1, e.g. http://gpu-node-1:8000/v1."""
    api_key: str | None = None
    model: str | None = None
    """The served model name to send; None: the first model the server lists."""
    max_in_flight: int = 1024
    """The cap, per process and server (every loop of the process shares it): with `adaptive`,
    the window (window.py) finds the server's knee under it. As high as the largest GPU's
    running batch (an H100 runs up to 1,024 sequences): a lower cap starves it."""
    adaptive: bool = True
    timeout: float | None = None
    """Seconds for one answer; None: `answer_timeout` of the request's max_tokens."""
    max_attempts: int = 4
    backoff_seconds: float = 0.5
    backoff_cap_seconds: float = 20.0
    outage_seconds: float = 300.0
    """How long a request keeps retrying while the server refuses connections (a restart)."""


DEFAULT_TIMEOUT = 900.0
"""A request without max_tokens may run to the model's context: 15 minutes."""
TIMEOUT_BASE, TIMEOUT_PER_TOKEN = 120.0, 0.25
"""A request with max_tokens gets 2 minutes (a wait in the server's queue, the prefill) and a
quarter second per token — a floor far under any GPU's per-sequence decode rate — so a long
answer is not cut off and retried from scratch."""


def answer_timeout(payload: dict[str, Any], fixed: float | None = None) -> float:
    """Seconds to wait for one answer: the operator's fixed figure, else what max_tokens
    (or max_completion_tokens, or a responses line's max_output_tokens) allows."""
    if fixed is not None:
        return fixed
    tokens = next(
        (
            payload[k]
            for k in ("max_completion_tokens", "max_tokens", "max_output_tokens")
            if isinstance(payload.get(k), int)
        ),
        None,
    )
    if tokens is None:
        return DEFAULT_TIMEOUT
    return min(DEFAULT_TIMEOUT, TIMEOUT_BASE + TIMEOUT_PER_TOKEN * tokens)


def engine_key(base_url: str, model: str) -> str:
    """Which server a chunk used, in the engine-time rows and metrics. A server on loopback is
    this machine's own: every node of a group runs its `vllm serve` at 127.0.0.1:8000, and one
    key for all of them would add every node's engine up as one — so the host name is part of
    it."""
    where = base_url.rstrip("/")
    host = httpx.URL(where).host
    try:
        local = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = False
    return f"{socket.gethostname()}:{where}#{model}" if local else f"{where}#{model}"


class _Limiter:
    """At most `size()` requests in flight (read at each acquire: the adaptive window moves);
    a freed slot goes to the waiter of the lowest priority number, then the earliest."""

    def __init__(self, size: Callable[[], int]):
        self.size = size
        self.used = 0
        self._waiting: list[tuple[int, int]] = []
        self._seq = itertools.count()
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def slot(self, priority: int) -> AsyncIterator[None]:
        entry = (priority, next(self._seq))
        heapq.heappush(self._waiting, entry)
        async with self._changed:
            while self._waiting[0] != entry or self.used >= max(1, self.size()):
                # Wake up now and then even without a release: the size may have grown.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), timeout=0.25)
            heapq.heappop(self._waiting)
            self.used += 1
            self._changed.notify_all()
        try:
            yield
        finally:
            async with self._changed:
                self.used -= 1
                self._changed.notify_all()


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds the server asks us to wait (Retry-After: seconds or an HTTP date), or None when
    it says nothing usable: then our own backoff applies. A malformed header must not turn a
    retriable answer into a crash, nor "inf" into a wait for ever."""
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            parsed = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if parsed.tzinfo is None:  # "-0000": RFC 5322's UTC of unknown origin
            parsed = parsed.replace(tzinfo=dt.UTC)
        seconds = parsed.timestamp() - time.time()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _server_message(response: httpx.Response) -> tuple[str, str]:
    """(code, message) from an OpenAI-style error body, or from the status line."""
    try:
        error = response.json().get("error", {})
        message = str(error.get("message") or response.text)
        code = error.get("code")
        kind = str(error.get("type") or "")
    except ValueError:
        message, code, kind = response.text[:500], None, ""
    if response.status_code == 400 and "maximum context length" in message:
        return "context_length_exceeded", message
    if isinstance(code, str) and code:
        return code, message
    return (kind or f"http_{response.status_code}"), message


class HttpEngine:
    """Every chunk the process sends shares one limit (`_limiter`): what is in flight stays
    within the cap and the window however many chunks and batches it spans."""

    def __init__(self, settings: ServerSettings):
        self.settings = settings
        # Not adaptive: no window, the cap alone.
        self.window = Window(cap=settings.max_in_flight) if settings.adaptive else None
        window, cap = self.window, settings.max_in_flight
        self._limiter = _Limiter((lambda: min(cap, window.limit)) if window else (lambda: cap))
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="http-engine", daemon=True
        )
        self._thread.start()
        self._client: httpx.AsyncClient = self._call(self._make_client())
        self.model, self.model_version = self._call(self._discover())
        self.engine_key = engine_key(settings.base_url, self.model)

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _make_client(self) -> httpx.AsyncClient:
        s = self.settings
        headers = {"Authorization": f"Bearer {s.api_key}"} if s.api_key else {}
        return httpx.AsyncClient(
            base_url=s.base_url.rstrip("/"),
            headers=headers,
            timeout=httpx.Timeout(s.timeout or DEFAULT_TIMEOUT, connect=10.0),
            limits=httpx.Limits(
                max_connections=s.max_in_flight, max_keepalive_connections=s.max_in_flight
            ),
        )

    async def _discover(self) -> tuple[str, str]:
        """The model to ask for, and a version naming its weights: the same folder served here
        or in process gets the same version, so cached answers are shared between them."""
        deadline = time.monotonic() + self.settings.outage_seconds
        while True:
            try:
                response = await self._client.get("/models")
                response.raise_for_status()
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(1.0)
        models = response.json().get("data", [])
        wanted = self.settings.model
        entry = next((m for m in models if m.get("id") == wanted), None) if wanted else None
        if entry is None and models and not wanted:
            entry = models[0]
        if entry is None:
            listed = ", ".join(m.get("id", "?") for m in models)
            raise RuntimeError(
                f"{self.settings.base_url} does not serve {wanted!r} (it lists: {listed})"
            )
        root = Path(str(entry.get("root") or ""))
        if (root / "config.json").is_file():
            return entry["id"], folder_version(root)
        return entry["id"], f"{entry['id']}@{entry.get('root') or self.settings.base_url}"

    # -- inference -------------------------------------------------------------------------

    def infer(
        self, requests: Sequence[EngineRequest], overlap: Overlap | None = None
    ) -> list[Reply]:
        """Every request of the chunk, within the process's one in-flight limit."""
        return list(self._call(self._infer_all(requests, overlap)))

    async def _infer_all(
        self, requests: Sequence[EngineRequest], overlap: Overlap | None
    ) -> list[Reply]:
        """Once every request of the chunk has a slot, the freed ones are the next chunk's."""
        unsent = len(requests)

        def sent() -> None:
            nonlocal unsent
            unsent -= 1
            if unsent == 0 and overlap is not None:
                overlap.room.set()

        return await asyncio.gather(*(self._one(r, sent) for r in requests))

    async def _one(self, request: EngineRequest, sent: Callable[[], None]) -> Reply:
        s = self.settings
        payload = orjson.loads(request.body_json)  # as validated and normalised at ingest
        payload["model"] = self.model
        if request.priority:  # vLLM's extension; a server without it is sent none
            payload["priority"] = request.priority
        content = orjson.dumps(payload)
        timeout = answer_timeout(payload, s.timeout)
        attempt, outage_started = 0, None
        last = Reply.error(503, "engine_unavailable", "no attempt made", retriable=True)
        while True:
            attempt += 1
            delay: float | None = None
            async with self._limiter.slot(request.priority):
                if attempt == 1:
                    sent()
                started = time.perf_counter()
                try:
                    response = await self._client.post(
                        request.url.removeprefix("/v1"),
                        content=content,
                        headers={"Content-Type": "application/json"},
                        timeout=httpx.Timeout(timeout, connect=10.0),
                    )
                    await response.aread()
                except httpx.ConnectError as exc:
                    # The server is down (or restarting): wait for it, without spending attempts.
                    outage_started = outage_started or time.monotonic()
                    if time.monotonic() - outage_started < s.outage_seconds:
                        attempt -= 1
                    last = Reply.error(
                        503, "engine_unavailable", f"cannot connect: {exc}", retriable=True
                    )
                except httpx.TimeoutException as exc:
                    self._overloaded()
                    last = Reply.error(
                        504,
                        "timeout",
                        f"no answer in {timeout:.0f} s ({type(exc).__name__})",
                        retriable=True,
                    )
                except httpx.TransportError as exc:  # reset, cut mid-body, protocol error
                    last = Reply.error(
                        502, "connection_error", f"{type(exc).__name__}: {exc}", retriable=True
                    )
                else:
                    latency_ms = (time.perf_counter() - started) * 1000
                    reply = self._from_response(response, latency_ms)
                    # A request holds one of the window's seats while in flight (gpu_time.py).
                    reply.engine_seconds = latency_ms / 1000 / max(self._limiter.size(), 1)
                    if response.status_code in OVERLOAD_STATUS:
                        self._overloaded()
                    elif self.window:
                        self.window.answered()
                    if reply.ok or not reply.retriable:
                        return reply
                    last, delay = reply, _retry_after(response)
            if attempt >= s.max_attempts:
                return last
            if delay is None:
                delay = RetryPolicy(s.backoff_seconds, s.backoff_cap_seconds).delay(attempt)
            await asyncio.sleep(delay)

    def _overloaded(self) -> None:
        if self.window:
            self.window.overloaded()

    def _from_response(self, response: httpx.Response, latency_ms: float) -> Reply:
        if response.status_code == 200:
            try:
                body = response.json()
                usage = body.get("usage") or {}
            except ValueError:
                return Reply.error(
                    502, "bad_response", "the server's answer is not JSON", retriable=True
                )
            return Reply(
                ok=True,
                body=response.text,
                # chat, completions, embeddings: prompt/completion; responses: input/output
                prompt_tokens=int(usage.get("prompt_tokens") or usage.get("input_tokens") or 0),
                completion_tokens=int(
                    usage.get("completion_tokens") or usage.get("output_tokens") or 0
                ),
                latency_ms=latency_ms,
                finished_at=time.time(),
            )
        code, message = _server_message(response)
        status = response.status_code
        reply = Reply.error(status, code, message, retriable=status in RETRIABLE_STATUS)
        reply.body = response.text or reply.body
        reply.latency_ms = latency_ms
        return reply


http_engine: PerProcess[ServerSettings, HttpEngine] = PerProcess(HttpEngine)
"""The process's engine for a server: one connection pool, one in-flight bound."""
