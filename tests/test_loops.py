"""Serving loops: the claim order across batches (tier, deadline, weight, route), the engine's
request priority, several batches in one engine, and a loop's life — killed, drained, missing.
The order on both stores; the engine is the real vLLM on CPU."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import func, select, update

from instruments.processes import wait_for
from offline_queue.engines.vllm_local import LocalVLLM
from offline_queue.loop import ServingLoop
from offline_queue.routes import in_process_route
from offline_queue.states import RequestState
from offline_queue.store import batches, claims, loops, results
from offline_queue.store.db import session
from offline_queue.store.tables import Request
from tests.conftest import REPO
from tests.test_pipeline import line, read, write
from tests.test_store import make_batch

ROUTE = "vllm:test"
LOOP_COMMAND = [sys.executable, "-m", "offline_queue.cli", "worker", "loop"]
LOOP_FLAGS = ["--chunk-size", "8", "--lease-seconds", "3"]


def loop_process(db: str) -> subprocess.Popen[bytes]:
    """`offline-queue worker loop` on the bundled model's route, as a node runs it."""
    return subprocess.Popen(
        [*LOOP_COMMAND, "--db", db, *LOOP_FLAGS],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def queued(db: str, tmp_path: Path, n: int, tag: str, **fields: Any) -> str:
    """A batch of `n` lines, queued, on ROUTE (or `route=`), with its tier and weight."""
    bid = make_batch(db, tmp_path, n, tag=tag, max_tokens=6)
    batches.label_batch(db, bid, **{"route": ROUTE, **fields})
    return bid


def claim_order(db: str, chunk: int = 4, **kwargs: Any) -> list[str]:
    """Every chunk the routes' queue hands out, settled at once: the batch of each."""
    order = []
    while (c := claims.claim_next(db, "loop", chunk, 60, routes=[ROUTE], **kwargs)) is not None:
        order.append(c.batch_id)
        with session(db) as s:  # answered: as a settle would leave them
            s.execute(
                update(Request)
                .where(Request.lease_token == c.token)
                .values(state=RequestState.COMPLETED, lease_token=None)
            )
    return order


def runs(order: list[str]) -> list[str]:
    """The batches in the order they were served, each run of chunks as one."""
    return [b for i, b in enumerate(order) if i == 0 or order[i - 1] != b]


def test_claims_take_the_most_urgent_tier_first(db_url: str, tmp_path: Path) -> None:
    bulk = queued(db_url, tmp_path, 12, "b", tier="bulk")
    standard = queued(db_url, tmp_path, 12, "s", tier="standard")
    critical = queued(db_url, tmp_path, 12, "c", tier="critical")
    assert runs(claim_order(db_url)) == [critical, standard, bulk]


def test_weights_one_to_three_get_one_to_three_of_the_requests(db_url: str, tmp_path: Path) -> None:
    light = queued(db_url, tmp_path, 200, "l", weight=1)
    heavy = queued(db_url, tmp_path, 300, "h", weight=3)
    order = claim_order(db_url)
    # While both have work: the heavy batch runs out at 300 requests, the light one at 100.
    last_heavy = max(i for i, b in enumerate(order) if b == heavy)
    served = Counter(order[: last_heavy + 1])
    ratio = served[heavy] / served[light]
    print(f"chunks while both had work: heavy {served[heavy]}, light {served[light]}")
    assert 3 * 0.85 <= ratio <= 3 * 1.15


def test_a_newcomer_starts_at_its_tiers_clock_not_at_zero(db_url: str, tmp_path: Path) -> None:
    """A batch that arrives after another has run a while gets one chunk at once, then shares
    by weight: it does not take the GPU until it has caught up with the other's past."""
    queued(db_url, tmp_path, 100, "o")
    for _ in range(10):  # the old batch has had 40 requests
        assert claims.claim_next(db_url, "loop", 4, 60, routes=[ROUTE]) is not None
    new = queued(db_url, tmp_path, 100, "n")
    order = claim_order(db_url)
    assert order[0] == new
    assert Counter(order[:11])[new] <= 7, order[:11]  # not the 10 it would take from zero


def test_a_batch_that_would_miss_its_window_goes_first_in_its_tier(
    db_url: str, tmp_path: Path
) -> None:
    early = queued(db_url, tmp_path, 12, "e")
    late = queued(db_url, tmp_path, 12, "l")
    critical = queued(db_url, tmp_path, 4, "c", tier="critical")
    assert batches.mark_late(db_url, late)
    assert runs(claim_order(db_url)) == [critical, late, early]


def test_a_loop_claims_only_its_route_and_above_a_rank_when_asked(
    db_url: str, tmp_path: Path
) -> None:
    bulk = queued(db_url, tmp_path, 4, "b", tier="bulk")
    other = queued(db_url, tmp_path, 4, "o", tier="critical", route="vllm:other")
    assert claims.claim_next(db_url, "loop", 4, 60, routes=[ROUTE], max_rank=2) is None
    got = claims.claim_next(db_url, "loop", 4, 60, routes=[ROUTE])
    assert got is not None and got.batch_id == bulk
    mine = claims.claim_next(db_url, "loop", 4, 60, routes=["vllm:other"])
    assert mine is not None and mine.batch_id == other
    claimed = batches.get_batch(db_url, bulk)
    assert claimed is not None and claimed.status == "in_progress" and claimed.vtime == 4.0


# ---- the engine ----------------------------------------------------------------------------


def _finish_order(engine: LocalVLLM, bulk_priority: int) -> tuple[list[float], list[float]]:
    """A bulk chunk far over what the engine runs at once, then a critical chunk: when each of
    their requests finished."""
    from offline_queue.engines.base import EngineRequest

    def chunk(tag: str, n: int, priority: int) -> list[EngineRequest]:
        body = line(tag, max_tokens=8, ignore_eos=True)["body"]

        return [
            EngineRequest(i, "/v1/chat/completions", orjson.dumps(body).decode(), priority)
            for i in range(n)
        ]

    got: dict[str, list[float]] = {}

    def serve(tag: str, n: int, priority: int) -> None:
        replies = engine.infer(chunk(tag, n, priority))
        assert all(r.ok for r in replies)
        got[tag] = sorted(r.finished_at or 0.0 for r in replies)

    bulk = threading.Thread(target=serve, args=("bulk", 400, bulk_priority))
    bulk.start()
    time.sleep(1.0)  # the bulk chunk fills the engine; most of it waits
    serve("critical", 6, 0)
    bulk.join()
    return got["critical"], got["bulk"]


def test_the_engine_schedules_a_critical_chunk_ahead_of_waiting_bulk_requests(
    engine: LocalVLLM,
) -> None:
    """vLLM's priority scheduling: the critical requests, added after 400 bulk ones (the engine
    runs ~240 at once), finish while most bulk requests still wait. At equal priority (what
    `fcfs` would do) they finish behind them: the order changed by the priority, not chance."""
    critical, bulk = _finish_order(engine, bulk_priority=2)
    ahead = sum(1 for t in bulk if t > critical[-1])
    print(f"priority: {ahead} of {len(bulk)} bulk requests finished after the last critical one")
    assert ahead >= len(bulk) // 3
    critical, bulk = _finish_order(engine, bulk_priority=0)
    behind = sum(1 for t in bulk if t > critical[-1])
    print(f"same priority: {behind} of {len(bulk)} bulk requests finished after the critical")
    assert behind < len(bulk) // 4


def test_small_batches_share_one_engine_and_one_loop(
    sqlite_url: str, tmp_path: Path, engine: LocalVLLM, prefect_api: str
) -> None:
    """Six batches of eight lines at once in this process: one loop on their route serves
    them all with the one engine (no load), chunks of several batches in it together."""
    from offline_queue.engines.vllm_local import local_engine
    from offline_queue.flows.batch import batch_inference

    made = len(local_engine._made)
    done: dict[int, dict[str, Any]] = {}

    def one(k: int) -> None:
        path = write(tmp_path / f"s{k}.jsonl", [line(f"s{k}-{i}", max_tokens=16) for i in range(8)])
        done[k] = batch_inference(input=str(path), db=sqlite_url, chunk_size=8)

    threads = [threading.Thread(target=one, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(local_engine._made) == made  # no engine was loaded for them
    for k, out in done.items():
        assert out["status"] == "completed"
        assert sorted(o["custom_id"] for o in read(out["output_file"])) == sorted(
            f"s{k}-{i}" for i in range(8)
        )
    from offline_queue.store.tables import EngineTime

    with session(sqlite_url) as s:
        served_by = set(s.scalars(select(EngineTime.loop)))
        spans = s.execute(
            select(EngineTime.batch_id, EngineTime.at - EngineTime.seconds, EngineTime.at)
        ).all()
    assert len(served_by) == 1, served_by
    overlapping = sum(
        1 for a in spans for b in spans if a[0] < b[0] and a[1] < b[2] and b[1] < a[2]
    )
    assert overlapping > 0, "no two batches were ever in the engine together"


def test_a_batch_nobody_serves_waits_with_its_reason_then_runs(
    sqlite_url: str, tmp_path: Path, engine: LocalVLLM, prefect_api: str, monkeypatch: Any
) -> None:
    from offline_queue.flows.batch import batch_inference
    from offline_queue.flows.waiting import SERVE_HERE_ENV

    monkeypatch.delenv(SERVE_HERE_ENV)  # as a deployment's run: only a node's loops serve
    path = write(tmp_path / "w.jsonl", [line(f"w{i}", max_tokens=4) for i in range(5)])
    done: dict[str, Any] = {}
    run = threading.Thread(
        target=lambda: done.update(batch_inference(input=str(path), db=sqlite_url))
    )
    run.start()
    route = in_process_route(None)

    def waiting() -> str | None:
        listed = batches.recent_batches(sqlite_url, 1)
        return listed[0].waiting_reason if listed else None

    reason = wait_for(waiting, timeout=120, interval=0.2)
    assert reason == f"no serving loop serves {route}"
    loop = ServingLoop(sqlite_url, engine, route, chunk_size=4).start()
    try:
        run.join(timeout=300)
    finally:
        loop.stop()
    assert done["status"] == "completed" and done["waiting_reason"] is None
    assert done["request_counts"]["completed"] == 5


def test_a_drained_loop_settles_what_it_holds_and_claims_nothing_more(
    db_url: str, tmp_path: Path, engine: LocalVLLM
) -> None:
    from offline_queue.engines.base import Overlap

    bid = queued(db_url, tmp_path, 40, "d")
    loop = ServingLoop(db_url, engine, ROUTE, chunk_size=8)
    started = threading.Event()
    real = loop._serve

    def serve(claim: claims.Claim, overlap: Overlap) -> Any:
        started.set()
        return real(claim, overlap)

    loop._serve = serve  # type: ignore[method-assign]  # to know when a chunk is in hand
    runner = threading.Thread(target=loop.run)
    runner.start()
    assert started.wait(120)
    assert loops.drain(db_url) == 1
    runner.join(timeout=300)
    assert not runner.is_alive()
    p = results.progress(db_url, bid)
    assert p.processing == 0 and 0 < p.completed < 40 and p.queued == 40 - p.completed
    assert loops.live_loops(db_url) == []  # it left


def test_a_loop_killed_mid_chunk_loses_nothing(
    sqlite_url: str, tmp_path: Path, engine: LocalVLLM
) -> None:
    """kill -9 of `offline-queue worker loop` while its chunks are in the engine: another loop
    claims them again after the lease; every line answered exactly once."""
    bid = make_batch(sqlite_url, tmp_path, 24, tag="k", max_tokens=24)
    route = in_process_route(None)
    batches.label_batch(sqlite_url, bid, route=route)
    proc = loop_process(sqlite_url)
    try:

        def leased() -> bool:
            with session(sqlite_url) as s:
                return bool(
                    s.scalar(
                        select(func.count()).where(
                            Request.batch_id == bid, Request.state == RequestState.PROCESSING
                        )
                    )
                )

        wait_for(leased, timeout=240, interval=0.1)
    finally:
        proc.kill()
        proc.wait()
    before = results.progress(sqlite_url, bid)
    assert before.processing > 0 and before.completed < 24
    loop = ServingLoop(sqlite_url, engine, route, chunk_size=8).start()
    try:
        wait_for(lambda: results.progress(sqlite_url, bid).pending == 0, timeout=300, interval=0.5)
    finally:
        loop.stop()
    with session(sqlite_url) as s:
        answered = Counter(
            s.scalars(
                select(Request.custom_id).where(
                    Request.batch_id == bid, Request.state == RequestState.COMPLETED
                )
            )
        )
    assert answered == Counter(f"k{i}" for i in range(24))


@pytest.fixture(autouse=True)
def _no_loop_left() -> Any:
    yield
    assert not [t for t in threading.enumerate() if t.name == "serving-loop" and t.is_alive()]


@pytest.mark.vllm  # a `worker loop` process with its engine
def test_a_loop_that_starts_while_the_store_is_down_serves_once_it_is_back(
    tmp_path: Path,
) -> None:
    """A node's loop process (`worker loop`) whose PostgreSQL is down when it joins (the fault
    schedule saw such a process exit 1) is started again every second in its process, and
    serves once the store is back."""
    from instruments.postgres import create_database, postgres

    route = in_process_route(None)
    with postgres() as pg:
        db = create_database(pg.url, "down")
        bid = make_batch(db, tmp_path, 8, tag="d", max_tokens=4)
        batches.label_batch(db, bid, route=route)
        pg.kill()
        proc = loop_process(db)
        try:
            time.sleep(20)  # its engine loads, its first joins fail
            assert proc.poll() is None, "the loop process exited while the store was down"
            pg.start()
            wait_for(lambda: results.settled_requests(db, bid) == 8, timeout=180)
        finally:
            proc.terminate()
            proc.wait(60)
