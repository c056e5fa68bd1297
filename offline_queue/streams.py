"""A Redis Streams consumer group in front of the queue: entries (field `line`, one batch line) are
queued as one batch per read in the transaction that records them, acknowledged only after it,
answered by the queue's serving loops and replied to `reply_to`; past `max_pending` unanswered
entries the consumers stop reading and the stream holds the surge. A read is validated while the
one before it is written (one write in flight, on a thread of its own): the store's work and
ours overlap instead of taking turns. (docs/scheduling.md, Single
requests and streams in the same queue; docs/user-guide.md, Redis Streams)
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from offline_queue.batch_object import LineError
from offline_queue.batches import file_line, virtual_outputs
from offline_queue.findings import Accepted, Rejected
from offline_queue.states import Tier
from offline_queue.store import results
from offline_queue.store import streams as store
from offline_queue.store.results import ResultLine
from offline_queue.submission import Submission
from offline_queue.validate import Limits, validate_line

log = logging.getLogger(__name__)

RESULTS_SUFFIX = ":results"
REPLY_SECONDS = 0.25
"""How often a consumer looks for answers to write (a look is over every unreplied entry)."""
WAITING_SECONDS = 1.0
"""How stale the backlog a consumer stops reading at may be (the rest it counts itself)."""


@dataclass(frozen=True)
class StreamSettings:
    redis_url: str
    stream: str
    group: str = "offline-queue"
    consumer: str = ""
    """Empty: this host and process."""
    tenant: str | None = None
    tier: Tier = Tier.BULK
    route: str = ""
    max_attempts: int = 3
    read_count: int = 256
    """Entries per read: one batch in the queue."""
    block_ms: int = 500
    claim_idle_ms: int = 30_000
    """An entry pending this long with another consumer is taken over (its consumer died)."""
    max_pending: int = 10_000
    reply_lease_seconds: float = 30.0

    @property
    def reply_stream(self) -> str:
        return self.stream + RESULTS_SUFFIX


TIERS = tuple(t.value for t in Tier)


def _refused(custom_id: str | None, message: str) -> Rejected:
    return Rejected(1, custom_id, LineError(code="invalid_request", message=message, line=1))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class StreamConsumer:
    """One member of the stream's consumer group (`offline-queue streams consume`)."""

    def __init__(self, db: str, settings: StreamSettings):
        import redis

        self.db, self.s = db, settings
        self.name = settings.consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.redis = redis.Redis.from_url(settings.redis_url)
        self.limits = Limits()
        self._stop = threading.Event()
        self.taken = self.queued = self.rejected = self.replied = 0
        self._writer: ThreadPoolExecutor | None = None
        self._writing: Future[None] | None = None
        self._in_write = 0
        """Entries of the write in flight: taken, not yet counted in `taken`."""
        self._recovered = False
        self._counted, self._counted_at, self._taken_at_count = 0, -WAITING_SECONDS, 0

    # -- the group ---------------------------------------------------------------------------

    def join(self) -> None:
        """Create the group if it is new (from the stream's start: entries already in it are
        work waiting) and the stream with it."""
        import redis

        try:
            self.redis.xgroup_create(self.s.stream, self.s.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def stop(self) -> None:
        self._stop.set()

    def stopped(self, timeout: float) -> bool:
        """Whether it was asked to stop, waiting up to `timeout` seconds for it."""
        return self._stop.wait(timeout)

    def run(self) -> None:
        """Take and reply until stopped; the last write is committed and acknowledged before
        it returns."""
        self.join()
        replied_at = 0.0
        try:
            while not self._stop.is_set():
                took = self.take_once()
                answered = 0
                if time.monotonic() - replied_at > REPLY_SECONDS:  # a look over the unreplied
                    answered, replied_at = self.reply_once(), time.monotonic()
                if not took and not answered and self._stop.wait(0.05):
                    break
        finally:
            self.flush()

    def flush(self) -> None:
        """Wait for the write in flight (raising its error) and end the writer's thread."""
        try:
            self._written()
        finally:
            if self._writer is not None:
                self._writer.shutdown(wait=True)
                self._writer = None

    # -- taking ------------------------------------------------------------------------------

    def take_once(self) -> int:
        """One read: this consumer's own pending entries first (after a restart), then those a
        dead consumer left idle, then new ones. Returns how many were taken."""
        room = min(self.s.read_count, self.s.max_pending - self._waiting())
        if room <= 0:  # the stream holds the surge
            self._stop.wait(self.s.block_ms / 1000)
            return 0
        entries = self._pending_own(room) if not self._recovered else []
        if not entries:
            if not self._recovered:
                self._written()  # own entries in flight are pending too: never read them twice
            self._recovered = True
            entries = self._idle_of_others(room)
        if not entries:
            read: Any = self.redis.xreadgroup(
                self.s.group, self.name, {self.s.stream: ">"}, count=room, block=self.s.block_ms
            )
            entries = [e for _, batch in read or [] for e in batch]
        if entries:
            self._take(entries)
        return len(entries)

    def _waiting(self) -> int:
        """The stream's entries waiting in the store: counted (a count over the queue) every
        WAITING_SECONDS, or at once when a read could reach `max_pending`; in between, what
        this consumer took since is added on, and always the write in flight. Near the limit
        the write in flight is committed first, so the other consumers' counts see it (the
        surge bound stays `max_pending` plus a read of one consumer, as without the overlap)."""
        now = time.monotonic()
        guess = self._counted + self.taken - self._taken_at_count + self._in_write
        near = guess + self.s.read_count >= self.s.max_pending
        if near:
            self._written()
        if near or now - self._counted_at > WAITING_SECONDS:
            self._counted = store.waiting(self.db, self.s.stream)
            self._counted_at, self._taken_at_count = now, self.taken
        return self._counted + self.taken - self._taken_at_count + self._in_write

    def _pending_own(self, room: int) -> list[tuple[bytes, dict[bytes, bytes]]]:
        read: Any = self.redis.xreadgroup(self.s.group, self.name, {self.s.stream: "0"}, count=room)
        return [e for _, batch in read or [] for e in batch if e[1]]

    def _idle_of_others(self, room: int) -> list[tuple[bytes, dict[bytes, bytes]]]:
        claimed: Any = self.redis.xautoclaim(
            self.s.stream,
            self.s.group,
            self.name,
            min_idle_time=self.s.claim_idle_ms,
            start_id="0-0",
            count=room,
        )
        return [e for e in claimed[1] if e[1]]

    def _take(self, entries: Sequence[tuple[Any, dict[Any, Any]]]) -> None:
        """Validate here, then hand the read to the writer once the one before is written."""
        good, errors = self._check(entries)
        self._written()
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="stream-write")
        self._in_write = len(entries)
        self._writing = self._writer.submit(self._write, entries, good, errors)

    def _written(self) -> None:
        """Wait for the write in flight; its error (the store down) is this read's."""
        writing, self._writing = self._writing, None
        if writing is not None:
            writing.result()

    def _check(
        self, entries: Sequence[tuple[Any, dict[Any, Any]]]
    ) -> tuple[dict[Tier, list[store.Entry]], list[tuple[str, bytes]]]:
        """The valid entries by tier, and the error lines of the others by where they go."""
        good: dict[Tier, list[store.Entry]] = {}
        errors: list[tuple[str, bytes]] = []
        for raw_id, fields in entries:
            entry_id = _text(raw_id)
            f = {_text(k): v for k, v in fields.items()}
            reply_to = _text(f.get("reply_to") or self.s.reply_stream)
            line = f.get("line")
            raw = line if isinstance(line, bytes) else str(line or "").encode()
            tier_word = _text(f.get("tier") or self.s.tier)
            checked = validate_line(1, raw, len(raw) > self.limits.max_line_bytes, self.limits)
            if line is None:
                checked = _refused(None, "line: missing (the entry's field `line` holds it)")
            elif tier_word not in TIERS:
                checked = _refused(
                    checked.custom_id, f"tier: {tier_word!r} is not one of {', '.join(TIERS)}"
                )
            if isinstance(checked, Accepted):
                good.setdefault(Tier(tier_word), []).append(
                    store.Entry(entry_id, reply_to, checked)
                )
            else:
                errors.append((reply_to, self._error_line(entry_id, checked)))
        return good, errors

    def _write(
        self,
        entries: Sequence[tuple[Any, dict[Any, Any]]],
        good: dict[Tier, list[store.Entry]],
        errors: list[tuple[str, bytes]],
    ) -> None:
        """Queue the valid ones (one transaction), answer the bad ones, then ack."""
        try:
            for tier, batch in good.items():
                queued = store.queue_entries(
                    self.db, self.s.stream, self._submission(tier, batch), self.s.route, batch
                )
                self.queued += len(queued)
            if errors:
                pipe = self.redis.pipeline()
                for reply_to, text in errors:
                    pipe.xadd(reply_to, {"line": text})
                pipe.execute()
                self.rejected += len(errors)
            # Only now, with every valid entry committed in the store (or found there): the ack.
            self.redis.xack(self.s.stream, self.s.group, *[e[0] for e in entries])
            self.taken += len(entries)
        finally:
            self._in_write = 0

    def _submission(self, tier: Tier, entries: Sequence[store.Entry]) -> Submission:
        batch_id = f"batch_{uuid.uuid4().hex}"
        digest = hashlib.sha256("\n".join(e.entry_id for e in entries).encode()).hexdigest()
        output, errors = virtual_outputs(batch_id)
        return Submission(
            id=batch_id,
            content_hash=digest,
            input_path=store.input_path(self.s.stream),
            output_path=output,
            error_path=errors,
            tier=tier,
            max_attempts=self.s.max_attempts,
            tenant=self.s.tenant,
            total_lines=len(entries),
        )

    @staticmethod
    def _error_line(entry_id: str, rejected: Rejected) -> bytes:
        message = rejected.error.message.replace("line 1:", f"entry {entry_id}:", 1)
        if not message.startswith("entry "):
            message = f"entry {entry_id}: {message}"
        row = ResultLine(
            line_no=1,
            custom_id=rejected.custom_id,
            response_id=results.response_id(),
            ok=False,
            status_code=None,
            body=None,
            error_code=rejected.error.code,
            error_message=message,
        )
        return file_line(row).rstrip(b"\n")

    # -- replying ----------------------------------------------------------------------------

    def reply_once(self) -> int:
        """Write the answers of this stream's entries that have one, then close what is done."""
        owner = f"{self.name}:{id(self)}"
        replies = store.claim_replies(
            self.db, self.s.stream, owner, self.s.read_count, self.s.reply_lease_seconds
        )
        if replies:
            pipe = self.redis.pipeline()
            for r in replies:
                pipe.xadd(r.reply_to, {"line": file_line(r.result).rstrip(b"\n")})
            pipe.execute()
            store.replied(self.db, self.s.stream, owner, [r.custom_id for r in replies])
            self.replied += len(replies)
        store.close_batches(self.db, self.s.stream)
        return len(replies)
