"""The engine contract, kept free of any engine library so the store and the flow can use it."""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import orjson

from offline_queue.formats import Body, parse_body


@dataclass(slots=True)
class EngineRequest:
    """One request for an engine. The body stays the JSON validated at ingest until an engine
    asks for the model: an engine that forwards JSON (a server) never pays for parsing it."""

    line_no: int
    url: str
    body_json: str
    priority: int = 0
    """vLLM's request priority, lower first: the batch's Tier.rank - 1 (critical 0)."""
    _body: Body | None = field(default=None, repr=False)

    @property
    def body(self) -> Body:
        if self._body is None:
            self._body = parse_body(self.url, self.body_json)
        return self._body


@dataclass(slots=True)
class Reply:
    """One request's answer or error, as data: an engine never raises for a single request."""

    ok: bool
    body: str | None
    """OpenAI response body (ok) or OpenAI error body (not ok), as JSON text."""
    status_code: int = 200
    error_code: str | None = None
    error_message: str | None = None
    retriable: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: float | None = None
    finished_at: float | None = None
    """When the answer arrived (epoch seconds): per-request timing, finer than the chunk's."""
    engine_seconds: float = 0.0
    """This request's part of the engine's time (offline_queue/gpu_time.py)."""

    @classmethod
    def error(cls, status_code: int, code: str, message: str, *, retriable: bool = False) -> Reply:
        kind = "invalid_request_error" if status_code < 500 else "server_error"
        body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
        return cls(
            ok=False,
            body=orjson.dumps(body).decode(),
            status_code=status_code,
            error_code=code,
            error_message=message,
            retriable=retriable,
        )


@dataclass
class Overlap:
    """What an engine tells the loop about one chunk in it: `room` is set once none of the
    engine's requests waits to be started, and the loop claims the next chunk then, so the
    engine stays full through a chunk's tail (offline_queue/loop.py)."""

    room: threading.Event = field(default_factory=threading.Event)


class Engine(Protocol):
    model_version: str
    """Names the exact weights: results are cached and stamped by it."""
    engine_key: str
    """What identifies the engine in the engine-time rows."""

    def infer(
        self, requests: Sequence[EngineRequest], overlap: Overlap | None = None
    ) -> list[Reply]:
        """One reply per request, in order; chunks of several threads run in the engine
        together. Raises only when the whole engine is unusable (a chunk-level fault the
        caller retries)."""
        ...


K = TypeVar("K", bound=Hashable)
E = TypeVar("E")


class PerProcess(Generic[K, E]):
    """One engine per settings per process, made on first use and kept: loading weights or
    opening a connection pool is paid once, however many chunks and batches follow."""

    def __init__(self, make: Callable[[K], E]):
        self._make = make
        self._made: dict[K, E] = {}
        self._lock = threading.Lock()

    def __call__(self, settings: K) -> E:
        with self._lock:
            if settings not in self._made:
                self._made[settings] = self._make(settings)
            return self._made[settings]
