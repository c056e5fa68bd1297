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
    unstarted: bool = False
    """Not answered because its worker handed the GPU over before the engine started it: it
    goes back to the queue as it was, no try spent (`Reply.handed_back`)."""

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

    @classmethod
    def handed_back(cls) -> Reply:
        return cls(ok=False, body=None, status_code=0, retriable=True, unstarted=True)


Share = Callable[[], int]
"""How many requests this batch may have in flight right now (read again and again)."""


@dataclass
class Overlap:
    """What a worker and an engine that `overlaps` chunks say to each other about one chunk.

    A chunk claimed ahead (behind another in the engine) is fed only into the seats the one
    before it frees, until the worker makes it the `lead` (the one before is settled and the
    GPU stays). `room` is set by the engine when the chunk leaves room for the next: none of
    its requests waits to be started. `hand_back` is set by the worker when its GPU goes to a
    higher tier at this chunk boundary: the chunk starts no more requests, and those it has
    not started come back `Reply.handed_back()`."""

    lead: threading.Event = field(default_factory=threading.Event)
    room: threading.Event = field(default_factory=threading.Event)
    hand_back: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class Seat:
    """Where a chunk sits in the engine: its batch's in-flight `share` (for engines that
    several batches use at once) and, for an engine that `overlaps`, the chunk's `overlap`."""

    share: Share | None = None
    overlap: Overlap | None = None


ALONE = Seat()
"""A chunk with no share to keep and nothing to overlap."""


class Engine(Protocol):
    model_version: str
    """Names the exact weights: results are cached and stamped by it."""
    shared: bool
    """Whether several batches (and processes) use this engine at once, and so share it."""
    engine_key: str
    """What identifies the engine across processes (for the share table)."""
    capacity: int
    """Requests in flight the engine takes at once (split between the batches sharing it)."""
    overlaps: bool
    """Whether the engine takes a second chunk from another thread while one is in it, fed
    only into the seats the first one frees, and heeds `Seat.overlap`."""

    def infer(self, requests: Sequence[EngineRequest], seat: Seat = ALONE) -> list[Reply]:
        """One reply per request, in order. Raises only when the whole engine is unusable
        (a chunk-level fault the caller retries)."""
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
