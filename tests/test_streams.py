"""A Redis stream's consumer group in front of the queue (Debian's redis-server on loopback, the
real engine): entries answered once on the results stream, bad ones refused, a consumer killed
between its read and its commit loses nothing, two consumers share a stream, and past
`max_pending` the stream holds the surge."""

from __future__ import annotations

import json
import subprocess
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from sqlalchemy import func, select, text

from instruments.processes import BIN, wait_for
from offline_queue.engines.vllm_local import LocalVLLM
from offline_queue.loop import ServingLoop
from offline_queue.routes import in_process_route
from offline_queue.states import BatchStatus
from offline_queue.store import streams as stream_store
from offline_queue.store.db import get_engine, session
from offline_queue.store.tables import Batch, Request
from offline_queue.streams import StreamConsumer, StreamSettings
from tests.conftest import REPO, cli_env
from tests.test_pipeline import line

ROUTE = in_process_route(None)


@pytest.fixture
def stream() -> str:
    return f"jobs-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    r = redis.Redis.from_url(redis_url)
    yield r
    r.close()


def add(r: redis.Redis, stream: str, custom_ids: list[str]) -> None:
    for cid in custom_ids:
        r.xadd(stream, {"line": json.dumps(line(cid, max_tokens=4))})


def answers(r: redis.Redis, stream: str) -> list[dict[str, Any]]:
    entries: Any = r.xrange(stream + ":results")
    return [json.loads(f[b"line"]) for _, f in entries]


def pending(r: redis.Redis, stream: str) -> int:
    """Entries read and not acknowledged (0 before the group exists)."""
    try:
        return int(r.xpending(stream, "offline-queue")["pending"])
    except redis.ResponseError:
        return 0


def consume(consumer: StreamConsumer) -> threading.Thread:
    t = threading.Thread(target=consumer.run, daemon=True)
    t.start()
    return t


def stored_requests(db: str, stream: str) -> Counter[str]:
    with session(db) as s:
        ids = s.scalars(
            select(Request.custom_id)
            .join(Batch, Batch.id == Request.batch_id)
            .where(Batch.input_path == stream_store.input_path(stream))
        )
        return Counter(ids)


def test_entries_are_answered_once_and_bad_ones_refused(
    db_url: str, client: redis.Redis, redis_url: str, stream: str, engine: LocalVLLM
) -> None:
    good = [f"g{i}" for i in range(12)]
    add(client, stream, good)
    client.xadd(stream, {"line": "{not json"})
    client.xadd(stream, {"line": json.dumps(line("badtier")), "tier": "urgent"})
    client.xadd(stream, {"other": "no line here"})
    misspelt = line("badbody")
    misspelt["body"]["max_token"] = 3
    client.xadd(stream, {"line": json.dumps(misspelt)})
    add(client, stream, ["g0"])  # the same custom_id again: answered once, not inferred twice
    loop = ServingLoop(db_url, engine, ROUTE, chunk_size=8).start()
    consumer = StreamConsumer(db_url, StreamSettings(redis_url, stream, route=ROUTE, block_ms=100))
    worker = consume(consumer)
    try:
        wait_for(lambda: len(answers(client, stream)) >= 16, timeout=180)
        wait_for(
            lambda: stream_store.close_batches(db_url, stream) == 0 and _all_closed(db_url, stream),
            30,
        )
    finally:
        consumer.stop()
        worker.join(30)
        loop.stop(60)
    got = answers(client, stream)
    ok = [a for a in got if a["error"] is None]
    refused = [a for a in got if a["error"] is not None]
    assert sorted(a["custom_id"] for a in ok) == sorted(good)  # each once
    assert all(a["response"]["status_code"] == 200 for a in ok)
    messages = sorted(a["error"]["message"] for a in refused)
    assert len(refused) == 4, messages
    assert all(m.startswith("entry ") for m in messages), messages
    assert any("body.max_token" in m for m in messages)
    assert any("tier: 'urgent'" in m for m in messages)
    assert any("not JSON" in m for m in messages)
    assert any("line: missing" in m for m in messages)
    assert pending(client, stream) == 0  # every entry acknowledged
    assert stored_requests(db_url, stream) == Counter(good)  # g0 queued once


def test_a_custom_id_seen_in_an_earlier_read_is_not_queued_again(
    db_url: str, client: redis.Redis, redis_url: str, stream: str
) -> None:
    """Reads of two entries: a, b, then a again (a redelivery) and c. The second read's rows
    go to the store in one piece (COPY on PostgreSQL), which its stored `a` refuses: they go
    again skipping what is there. a, b and c are queued once each, every entry acknowledged."""
    add(client, stream, ["a", "b", "a", "c"])
    consumer = StreamConsumer(db_url, StreamSettings(redis_url, stream, read_count=2))
    consumer.join()
    try:
        assert consumer.take_once() == 2
        assert consumer.take_once() == 2
    finally:
        consumer.flush()
    assert stored_requests(db_url, stream) == Counter(["a", "b", "c"])
    assert (consumer.taken, consumer.queued) == (4, 3)
    assert pending(client, stream) == 0


def _all_closed(db: str, stream: str) -> bool:
    with session(db) as s:
        open_ = s.scalar(
            select(func.count()).where(
                Batch.input_path == stream_store.input_path(stream),
                Batch.status != BatchStatus.COMPLETED,
            )
        )
    return open_ == 0


def test_a_consumer_killed_between_read_and_commit_loses_nothing(
    pg_url: str,
    client: redis.Redis,
    redis_url: str,
    stream: str,
    engine: LocalVLLM,
    prefect_api: str,
) -> None:
    """Consumer A (a real `streams consume` process) reads entries while the store holds its
    commit (the table it writes is locked), and is killed -9 there: its entries stay pending,
    unacknowledged. Consumer B takes them over once idle; every entry is answered once and
    queued once. (With the acknowledgement moved before the commit, A's entries are lost.)"""
    ids = [f"k{i}" for i in range(24)]
    add(client, stream, ids)
    get_engine(pg_url)  # migrated before the lock below
    holder = get_engine(pg_url).connect()
    tx = holder.begin()
    holder.execute(text("LOCK TABLE stream_entries IN ACCESS EXCLUSIVE MODE"))
    a = subprocess.Popen(
        [
            str(BIN / "offline-queue"),
            "streams",
            "consume",
            "--no-serve",
            "--redis",
            redis_url,
            "--stream",
            stream,
            "--consumer",
            "a",
            "--db",
            pg_url,
        ],
        env=cli_env(prefect_api),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: pending(client, stream) > 0, timeout=120)
        a.kill()  # read, validated, blocked at its commit
        a.wait(30)
    finally:
        tx.rollback()
        holder.close()
    held = pending(client, stream)
    assert held == len(ids), held  # nothing acknowledged without its commit
    assert stored_requests(pg_url, stream) == Counter()
    loop = ServingLoop(pg_url, engine, ROUTE, chunk_size=8).start()
    b = StreamConsumer(
        pg_url,
        StreamSettings(
            redis_url, stream, consumer="b", route=ROUTE, block_ms=100, claim_idle_ms=500
        ),
    )
    worker = consume(b)
    try:
        wait_for(lambda: len(answers(client, stream)) >= len(ids), timeout=180)
    finally:
        b.stop()
        worker.join(30)
        loop.stop(60)
    assert sorted(x["custom_id"] for x in answers(client, stream)) == sorted(ids)
    assert stored_requests(pg_url, stream) == Counter(ids)
    assert pending(client, stream) == 0


def test_two_consumers_share_a_stream_and_stop_reading_past_max_pending(
    sqlite_url: str, client: redis.Redis, redis_url: str, stream: str, engine: LocalVLLM
) -> None:
    ids = [f"s{i}" for i in range(48)]
    add(client, stream, ids)

    def member(name: str) -> StreamConsumer:
        settings = StreamSettings(
            redis_url,
            stream,
            consumer=name,
            route=ROUTE,
            block_ms=100,
            read_count=8,
            max_pending=16,
        )
        return StreamConsumer(sqlite_url, settings)

    a, b = member("a"), member("b")
    workers = [consume(a), consume(b)]
    try:
        # Nobody serves yet: the consumers stop at max_pending, the stream keeps the rest.
        wait_for(lambda: stream_store.waiting(sqlite_url, stream) >= 16, timeout=60)
        threading.Event().wait(1.5)
        taken = a.taken + b.taken
        assert 16 <= stream_store.waiting(sqlite_url, stream) <= 16 + 8, taken
        assert taken < len(ids)
        loop = ServingLoop(sqlite_url, engine, ROUTE, chunk_size=8).start()
        try:
            wait_for(lambda: len(answers(client, stream)) >= len(ids), timeout=240)
        finally:
            loop.stop(60)
    finally:
        a.stop()
        b.stop()
        for w in workers:
            w.join(30)
    assert sorted(x["custom_id"] for x in answers(client, stream)) == sorted(ids)
    assert a.taken > 0 and b.taken > 0, (a.taken, b.taken)
    assert a.taken + b.taken == len(ids)
