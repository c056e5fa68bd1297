"""The queue's invariants on SQLite and a real PostgreSQL: claims never overlap, a settle from a
lost lease commits nothing, retries end in exactly one result, an interrupted ingest resumes.

One file on purpose: every test is the same invariant (each request once, whatever the store
and however the workers fail) met through one claim/settle machinery and its fixtures."""

from __future__ import annotations

import functools
import itertools
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from instruments.postgres import postgres
from instruments.processes import wait_for
from offline_queue.engines.base import Reply
from offline_queue.findings import Accepted
from offline_queue.gpu_time import EngineUse
from offline_queue.leases import LeaseKeeper
from offline_queue.queue_file import IngestProcessFailed, queue_batch_file
from offline_queue.retry import RetryPolicy
from offline_queue.store import batches, claims, ingest, results, stats
from offline_queue.store.db import patiently, session
from offline_queue.store.tables import Request, Result
from offline_queue.submission import Submission
from offline_queue.validate import Limits, inspect_file, validate_file
from tests.conftest import REPO

NOWHERE = Path("/nowhere")


def system_prompt(i: int, prefixes: int) -> str | None:
    """Line i's shared system prompt when a batch has `prefixes` of them, in a shuffled order
    (a fixed permutation of line numbers, so no two neighbours need share one)."""
    return f"system prompt {(i * 7919) % 9973 % prefixes}" if prefixes else None


def submission(batch_id: str, content_hash: str = "0" * 64, folder: Path = NOWHERE) -> Submission:
    """A batch `batch_id` of in.jsonl in `folder`, its outputs out.jsonl and err.jsonl there."""
    source, out, err = (str(folder / f"{name}.jsonl") for name in ("in", "out", "err"))
    return Submission(batch_id, content_hash, source, out, err)


def make_batch(
    db: str,
    tmp_path: Path,
    n: int,
    bad_every: int = 0,
    tag: str = "r",
    prefixes: int = 0,
    max_tokens: int | None = None,
) -> str:
    path = tmp_path / f"in-{n}.jsonl"
    with path.open("w") as f:
        for i in range(n):
            body: dict = {"model": "m", "messages": [{"role": "user", "content": f"q{i}"}]}
            if (system := system_prompt(i, prefixes)) is not None:
                body["messages"].insert(0, {"role": "system", "content": system})
            if max_tokens is not None:
                body["max_tokens"] = max_tokens
            if bad_every and i % bad_every == 0:
                body["max_tokens"] = -1
            f.write(
                json.dumps(
                    {
                        "custom_id": f"{tag}{i}",
                        "method": "POST",
                        "url": "/v1/chat/completions",
                        "body": body,
                    }
                )
                + "\n"
            )
    info = inspect_file(path, Limits())
    placed = submission(f"batch_{info.content_hash[:16]}", info.content_hash, tmp_path)
    batch, created = batches.register_batch(db, replace(placed, input_path=str(path)))
    assert created
    ingest.ingest(db, batch.id, validate_file(path, Limits()), group_size=100)
    ingest.finish_ingest(db, batch.id)
    return batch.id


def ok_reply() -> Reply:
    return Reply(ok=True, body='{"ok": true}', prompt_tokens=3, completion_tokens=2)


def result_rows(db: str, batch_id: str) -> list[tuple[int, bool]]:
    with session(db) as s:
        rows = s.execute(select(Result.line_no, Result.ok).where(Result.batch_id == batch_id))
        return [(line_no, ok) for line_no, ok in rows]


def test_register_is_idempotent_and_refuses_other_content(db_url: str, tmp_path: Path) -> None:
    bid = make_batch(db_url, tmp_path, 5)
    batch = batches.get_batch(db_url, bid)
    assert batch is not None
    same = Submission(
        bid, batch.content_hash, batch.input_path, batch.output_path, batch.error_path
    )
    again, created = batches.register_batch(db_url, same)
    assert not created and again.id == bid
    with pytest.raises(batches.BatchConflict, match="different content"):
        batches.register_batch(db_url, submission(bid))


def test_concurrent_claims_never_overlap(db_url: str, tmp_path: Path) -> None:
    bid = make_batch(db_url, tmp_path, 400, prefixes=5)  # claims reorder: prefix order
    claimed: list[list[int]] = [[] for _ in range(4)]

    def worker(k: int) -> None:
        owner = claims.new_owner()
        while True:
            c = claims.claim(db_url, bid, owner, 7, lease_seconds=60)
            if c is None:
                return
            claimed[k] += [r.id for r in c.requests]
            claims.settle(db_url, bid, c, [claims.Outcome(r, ok_reply()) for r in c.requests], 3)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = list(itertools.chain(*claimed))
    assert len(every) == 400 and len(set(every)) == 400
    assert sum(1 for c in claimed if c) >= 2  # the work really was shared
    assert len(result_rows(db_url, bid)) == 400


def _system_of(db: str, ids: list[int]) -> list[str]:
    with session(db, readonly=True) as s:
        found = s.execute(select(Request.id, Request.body).where(Request.id.in_(ids)))
        rows: dict[int, str] = {i: body for i, body in found}
    return [json.loads(rows[i])["messages"][0]["content"] for i in ids]


def _runs(keys: list[str]) -> int:
    """How many contiguous runs of equal keys."""
    return sum(1 for _ in itertools.groupby(keys))


def test_claims_go_in_prefix_order_each_request_once(db_url: str, tmp_path: Path) -> None:
    """Shuffled shared system prompts: chunks of 7 hand them out one prefix group after
    another (5 runs, not hundreds), every request once."""
    bid = make_batch(db_url, tmp_path, 300, prefixes=5)
    order: list[int] = []
    while (c := claims.claim(db_url, bid, "w", 7, lease_seconds=60)) is not None:
        order += [r.id for r in c.requests]
        claims.settle(db_url, bid, c, [claims.Outcome(r, ok_reply()) for r in c.requests], 3)
    assert len(order) == len(set(order)) == 300
    systems = _system_of(db_url, order)
    assert _runs(systems) == 5, f"{_runs(systems)} runs of system prompts"


_CLAIMER = """
import sys, time
from offline_queue.engines.base import Reply
from offline_queue.leases import LeaseKeeper
from offline_queue.store import claims
db, bid = sys.argv[1:]
while (c := claims.claim(db, bid, "doomed", 6, lease_seconds=0.5)) is not None:
    ok = Reply(ok=True, body="{}", prompt_tokens=1, completion_tokens=1)
    claims.settle(db, bid, c, [claims.Outcome(r, ok) for r in c.requests], 3)
    print(len(c.requests), flush=True)
    time.sleep(0.05)
"""


def test_kill_9_mid_batch_then_resume_in_prefix_order(db_url: str, tmp_path: Path) -> None:
    """A claiming process SIGKILLed mid-batch, its last chunk leased: after the lease runs out
    a resuming worker finishes the batch, every line answered exactly once."""
    bid = make_batch(db_url, tmp_path, 240, prefixes=4)
    proc = psutil.Popen(
        [sys.executable, "-c", _CLAIMER, db_url, bid], cwd=REPO, stdout=subprocess.PIPE
    )
    try:
        wait_for(lambda: len(result_rows(db_url, bid)) >= 30, timeout=60, interval=0.02)
    finally:
        proc.kill()
        proc.wait()
    before = len(result_rows(db_url, bid))
    assert before < 240, "the batch finished before it could be killed"
    time.sleep(0.6)  # the killed worker's lease (if it held one) runs out
    order: list[int] = []
    while (c := claims.claim(db_url, bid, "resumer", 6, lease_seconds=60)) is not None:
        order += [r.id for r in c.requests]
        claims.settle(db_url, bid, c, [claims.Outcome(r, ok_reply()) for r in c.requests], 3)
    rows = result_rows(db_url, bid)
    assert len(rows) == 240 and len({line for line, _ in rows}) == 240
    assert len(order) == len(set(order)) <= 240 - before + 6
    systems = _system_of(db_url, order)
    assert _runs(systems) <= 5  # the rest, still grouped (one group the kill cut in two)


def test_settle_from_a_lost_lease_commits_nothing(db_url: str, tmp_path: Path) -> None:
    bid = make_batch(db_url, tmp_path, 10)
    first = claims.claim(db_url, bid, "worker-a", 10, lease_seconds=0.5)
    assert first is not None and len(first.requests) == 10
    assert claims.claim(db_url, bid, "worker-b", 10, lease_seconds=60) is None  # still leased
    time.sleep(0.6)
    second = claims.claim(db_url, bid, "worker-b", 10, lease_seconds=60)
    assert second is not None and {r.id for r in second.requests} == {r.id for r in first.requests}
    assert all(r.attempts == 2 for r in second.requests)

    late = claims.settle(
        db_url, bid, first, [claims.Outcome(r, ok_reply()) for r in first.requests], 5
    )
    assert late.completed == 0 and late.lost == 10
    assert result_rows(db_url, bid) == []

    done = claims.settle(
        db_url, bid, second, [claims.Outcome(r, ok_reply()) for r in second.requests], 5
    )
    assert done.completed == 10
    replay = claims.settle(
        db_url, bid, second, [claims.Outcome(r, ok_reply()) for r in second.requests], 5
    )
    assert replay.completed == 0 and replay.lost == 10
    assert len(result_rows(db_url, bid)) == 10


def test_renewed_lease_is_not_claimed_again(db_url: str, tmp_path: Path) -> None:
    bid = make_batch(db_url, tmp_path, 3)
    c = claims.claim(db_url, bid, "a", 10, lease_seconds=0.3)
    assert c is not None
    for _ in range(4):
        time.sleep(0.15)
        assert claims.renew_leases(db_url, [c.token], 0.3) == 3
        assert claims.claim(db_url, bid, "b", 10, lease_seconds=60) is None


def test_a_lease_keeper_keeps_a_chunk_from_other_workers_until_it_stops(
    db_url: str, tmp_path: Path
) -> None:
    """The keeper's thread renews what it holds every third of a lease (offline_queue/heartbeat.py):
    held for five leases, nobody else can claim the chunk; once the keeper stops, a lease later
    somebody can."""
    bid = make_batch(db_url, tmp_path, 3)
    lease = 0.6
    c = claims.claim(db_url, bid, "a", 10, lease_seconds=lease)
    assert c is not None
    keeper = LeaseKeeper(db_url, lease).start()
    try:
        with keeper.holding(c.token):
            deadline = time.monotonic() + 5 * lease
            while time.monotonic() < deadline:
                assert claims.claim(db_url, bid, "b", 10, lease_seconds=60) is None
                time.sleep(lease / 4)
    finally:
        keeper.stop()
    time.sleep(lease * 1.5)
    again = claims.claim(db_url, bid, "b", 10, lease_seconds=60)
    assert again is not None and len(again.requests) == 3


def test_retriable_failures_back_off_then_terminate_with_one_error(
    db_url: str, tmp_path: Path
) -> None:
    bid = make_batch(db_url, tmp_path, 2)
    # Long enough that a loaded machine cannot reach the next claim before the backoff ends.
    policy = RetryPolicy(base_seconds=0.5, cap_seconds=0.5)
    fail = Reply.error(503, "engine_unavailable", "busy", retriable=True)
    outcomes = []
    for _attempt in range(3):
        if _attempt:
            time.sleep(0.8)  # past the longest backoff (the 0.5 s cap)
        c = claims.claim(db_url, bid, "w", 10, lease_seconds=60)
        assert c is not None and len(c.requests) == 2
        outcomes.append(
            claims.settle(db_url, bid, c, [claims.Outcome(r, fail) for r in c.requests], 3, policy)
        )
        assert claims.claim(db_url, bid, "w", 10, lease_seconds=60) is None  # backing off
    assert [o.retried for o in outcomes] == [2, 2, 0]
    assert outcomes[-1].terminated == 2
    assert claims.claim(db_url, bid, "w", 10, lease_seconds=60) is None
    rows = result_rows(db_url, bid)
    assert sorted(rows) == [(1, False), (2, False)]
    p = results.progress(db_url, bid)
    assert (p.pending, p.completed, p.failed) == (0, 0, 2)


def test_a_request_whose_workers_all_die_ends_as_an_error(db_url: str, tmp_path: Path) -> None:
    """A request whose every worker died on it (the lease ran out each time) is not claimed
    forever: past max_attempts it settles as a `worker_lost` error, exactly once."""
    bid = make_batch(db_url, tmp_path, 3)
    for attempt in range(1, 4):  # max_attempts 2: two tries, both workers die
        c = claims.claim(db_url, bid, f"dies-{attempt}", 10, lease_seconds=0.05)
        assert c is not None and {r.attempts for r in c.requests} == {attempt}
        given_up = claims.abandoned(c, max_attempts=2)
        assert len(given_up) == (3 if attempt == 3 else 0)
        time.sleep(0.1)  # the lease runs out: the worker is gone
    assert c is not None
    settled = claims.settle(db_url, bid, c, given_up, max_attempts=2)
    assert settled.terminated == 3 and settled.retried == 0
    assert claims.claim(db_url, bid, "next", 10, lease_seconds=60) is None
    with session(db_url) as s:
        rows = s.execute(select(Result.error_code, Result.error_message)).all()
    assert [code for code, _ in rows] == ["worker_lost"] * 3
    assert "2 tries ended without an answer" in rows[0][1]
    p = results.progress(db_url, bid)
    assert (p.pending, p.completed, p.failed) == (0, 0, 3)


def test_terminal_failure_is_not_retried(db_url: str, tmp_path: Path) -> None:
    bid = make_batch(db_url, tmp_path, 1)
    c = claims.claim(db_url, bid, "w", 10, lease_seconds=60)
    assert c is not None
    bad = Reply.error(400, "context_length_exceeded", "too long")
    s = claims.settle(db_url, bid, c, [claims.Outcome(r, bad) for r in c.requests], 3)
    assert s.terminated == 1
    with session(db_url) as ss:
        row = ss.scalars(select(Result)).one()
        assert row.status_code == 400 and row.error_code == "context_length_exceeded"


def test_interrupted_ingest_resumes_without_duplicates(db_url: str, tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    lines = [
        {
            "custom_id": f"r{i % 90}",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": "m", "prompt": str(i)},
        }
        for i in range(100)
    ]  # r0..r9 appear twice: lines 91..100 are duplicates
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    batch_id = _register_file(db_url, path, "batch_resume")

    class Crash(Exception):
        pass

    def crashing(items):  # dies after 45 lines, midway through a group
        for n, item in enumerate(items):
            if n == 45:
                raise Crash
            yield item

    with pytest.raises(Crash):
        ingest.ingest(db_url, batch_id, crashing(validate_file(path, Limits())), group_size=20)
    mid = batches.get_batch(db_url, batch_id)
    assert mid is not None and mid.ingested_through == 40  # two whole groups committed

    queue_batch_file(db_url, batch_id, own_process=False, group_size=20)  # the resume
    accepted, total = ingest.finish_ingest(db_url, batch_id)
    assert (accepted, total) == (90, 100)
    with session(db_url) as s:
        assert s.scalar(select(func.count()).select_from(Request)) == 90
        rejected = s.scalars(select(Result.line_no).order_by(Result.line_no)).all()
    assert rejected == list(range(91, 101))


def _register_file(db: str, path: Path, batch_id: str) -> str:
    """Register the batch file at `path` under `batch_id`; returns the id."""
    info = inspect_file(path, Limits())
    batch, _ = batches.register_batch(
        db, Submission(batch_id, info.content_hash, str(path), "o", "e")
    )
    return batch.id


def _ingest_file(db: str, tmp_path: Path, n: int, ids_repeat_after: int = 0) -> tuple[Path, str]:
    """n lines: every 7th has a bad field, every 10th repeats the custom_id of the line before
    (or, with `ids_repeat_after`, line i takes the id of line i - ids_repeat_after)."""
    path = tmp_path / "in.jsonl"
    with path.open("w") as f:
        for i in range(n):
            body: dict = {"model": "m", "messages": [{"role": "user", "content": f"q\t{i}\\"}]}
            if i % 7 == 3:
                body["max_tokens"] = 0
            cid = f"r {i - 1 if i % 10 == 9 else i}"
            if ids_repeat_after:
                cid = f"r {i % ids_repeat_after}"
            line = {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions"}
            f.write(json.dumps({**line, "body": body}) + "\n")
    batch_id = _register_file(db, path, "batch_many")
    return path, batch_id


def _assert_ingested_once(db: str, batch_id: str, path: Path) -> None:
    expected = list(validate_file(path, Limits()))  # what one undisturbed pass decides
    accepted, total = ingest.finish_ingest(db, batch_id)
    good = [(x.line_no, x.custom_id, x.body_json) for x in expected if not hasattr(x, "error")]
    bad = [x.line_no for x in expected if hasattr(x, "error")]
    assert (accepted, total) == (len(good), len(expected))
    with session(db) as s:
        rows = s.execute(
            select(Request.line_no, Request.custom_id, Request.body).order_by(Request.line_no)
        ).all()
        errors = s.execute(
            select(Result.line_no, Result.error_message).order_by(Result.line_no)
        ).all()
    assert [tuple(r) for r in rows] == good
    assert [line for line, _ in errors] == bad
    assert "max_tokens" in errors[0][1] and errors[0][1].startswith(f"line {bad[0]}:")
    batch = batches.get_batch(db, batch_id)
    assert batch is not None and batch.ingested_through == len(expected)


def test_ingest_stores_any_custom_id_and_rejects_what_no_column_holds(
    db_url: str, tmp_path: Path
) -> None:
    """custom_ids with COPY's special characters are stored as given; one with a NUL, or too
    long for the column, is a rejected line whose error row is written, not a failed ingest."""
    ids = ["tab\there", "back\\slash", "new\nline", "cr\rx", "\\N", "ü 😀", "a\x00b", "x" * 600]
    path = tmp_path / "in.jsonl"
    with path.open("w") as f:
        for cid in ids:
            body = {"model": "m", "messages": [{"role": "user", "content": f"{cid}\\\t"}]}
            line = {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions"}
            f.write(json.dumps({**line, "body": body}) + "\n")
    batch_id = _register_file(db_url, path, "batch_ids")
    ingest.ingest(db_url, batch_id, validate_file(path, Limits()), group_size=3)
    assert ingest.finish_ingest(db_url, batch_id) == (6, 8)
    good = [
        (x.line_no, x.custom_id, x.body_json)
        for x in validate_file(path, Limits())
        if isinstance(x, Accepted)
    ]
    with session(db_url) as s:
        rows = s.execute(
            select(Request.line_no, Request.custom_id, Request.body).order_by(Request.line_no)
        ).all()
        errors = s.execute(select(Result.line_no, Result.custom_id, Result.error_message)).all()
    assert [tuple(r) for r in rows] == good and [cid for _, cid, _ in good] == ids[:6]
    assert [(line, cid) for line, cid, _ in errors] == [(7, None), (8, None)]
    assert "NUL" in errors[0][2] and "512" in errors[1][2]


def _all_at_once(calls: list[Callable[[], object]]) -> None:
    """Each call on a thread of its own, released together; any exception raised here."""
    start = threading.Barrier(len(calls))
    failures: list[BaseException] = []

    def run(call: Callable[[], object]) -> None:
        try:
            start.wait()
            call()
        except BaseException as exc:  # surfaced below
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(c,)) for c in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures


def test_concurrent_ingesters_converge(db_url: str, tmp_path: Path) -> None:
    """Two workers ingest the same batch at once (groups interleave): every line once."""
    path, bid = _ingest_file(db_url, tmp_path, 600)

    def worker() -> None:
        ingest.ingest(db_url, bid, validate_file(path, Limits()), group_size=25)

    _all_at_once([worker, worker])
    _assert_ingested_once(db_url, bid, path)


def test_ingester_behind_the_watermark_skips_committed_lines(db_url: str, tmp_path: Path) -> None:
    """A worker whose pass started before another committed (it read an older watermark)
    streams lines already queued: they are skipped, the rest queued once, the resume exact."""
    path, bid = _ingest_file(db_url, tmp_path, 300)

    def first(n: int):  # a worker that dies after n lines
        for item in validate_file(path, Limits()):
            if item.line_no > n:
                raise RuntimeError("killed")
            yield item

    with pytest.raises(RuntimeError):
        ingest.ingest(db_url, bid, first(130), group_size=40)  # commits lines 1..120
    mid = batches.get_batch(db_url, bid)
    assert mid is not None and mid.ingested_through == 120
    # Started at line 1 with no memory of the committed ids (its pass began before them).
    ingest.ingest(db_url, bid, validate_file(path, Limits()), group_size=33)
    _assert_ingested_once(db_url, bid, path)


def test_resumers_racing_after_a_crash_reject_every_repeated_custom_id(
    db_url: str, tmp_path: Path
) -> None:
    """custom_ids are unique per batch by validation alone (no index): an ingest dies after
    committing ids that come back later in the file, then three workers resume it at once the
    way the flow does (watermark, then the committed ids) — every repeat is rejected, once."""
    path, bid = _ingest_file(db_url, tmp_path, 400, ids_repeat_after=150)

    def dies_after(n: int):
        for item in validate_file(path, Limits()):
            if item.line_no > n:
                raise RuntimeError("killed")
            yield item

    with pytest.raises(RuntimeError):
        ingest.ingest(db_url, bid, dies_after(130), group_size=20)
    _all_at_once(
        [
            functools.partial(queue_batch_file, db_url, bid, own_process=False, group_size=g)
            for g in (7, 11, 13)
        ]
    )
    _assert_ingested_once(db_url, bid, path)
    with session(db_url) as s:
        ids = s.scalars(select(Request.custom_id)).all()
    assert len(ids) == len(set(ids)) < 400


def _ingested_through(db: str, batch_id: str) -> int:
    batch = batches.get_batch(db, batch_id)
    assert batch is not None
    return batch.ingested_through


def test_a_file_queued_in_its_own_process_is_queued_the_same(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The size rule sends the file to a process of its own (floor 0 here); the store ends up
    as one undisturbed pass in this process decides."""
    path, bid = _ingest_file(db_url, tmp_path, 600)
    monkeypatch.setenv("OFFLINE_QUEUE_OWN_PROCESS_MIN_BYTES", "0")
    queue_batch_file(db_url, bid)
    _assert_ingested_once(db_url, bid, path)


def test_a_failed_ingest_process_raises_with_its_reason(db_url: str, tmp_path: Path) -> None:
    path, bid = _ingest_file(db_url, tmp_path, 20)
    path.unlink()
    with pytest.raises(IngestProcessFailed, match=f"FileNotFoundError.*{path.name}"):
        queue_batch_file(db_url, bid, own_process=True)
    batch = batches.get_batch(db_url, bid)
    assert batch is not None and batch.ingested_through == 0 and not batch.ingest_done


def test_a_killed_worker_takes_its_ingest_process_along(db_url: str, tmp_path: Path) -> None:
    """kill -9 of the worker mid-ingest: its ingest process exits too (no orphan queues on
    behind a resumed run), and the resume queues every line once."""
    path, bid = _ingest_file(db_url, tmp_path, 150_000)
    code = "import sys; from offline_queue.queue_file import queue_batch_file as q; " + (
        "q(*sys.argv[1:], own_process=True)"
    )
    worker = psutil.Popen([sys.executable, "-c", code, db_url, bid], cwd=REPO)
    try:
        wait_for(lambda: _ingested_through(db_url, bid) > 0, timeout=120, interval=0.05)
        (child,) = worker.children()
        assert "offline_queue.queue_file" in child.cmdline()
    finally:
        worker.kill()
        worker.wait()
    child.wait(timeout=10)  # raises if the child ingests on
    through = _ingested_through(db_url, bid)
    assert 0 < through < 150_000, "the ingest finished before it could be killed"
    queue_batch_file(db_url, bid, own_process=False)
    _assert_ingested_once(db_url, bid, path)


def test_release_tracks_stats_and_agreement(db_url: str, tmp_path: Path) -> None:
    """Both tracks answered the same deterministic requests: agreement counts equal answers;
    track stats count model errors, not rejected input lines."""
    import orjson

    from offline_queue.store.tables import Batch

    def answer(text: str) -> str:
        return orjson.dumps({"choices": [{"message": {"content": text}}]}).decode()

    ids = {}
    for track, version, texts in (
        ("stable", "v1", ["a", "b", "c"]),
        ("candidate", "v2", ["a", "b", "X"]),
    ):
        (tmp_path / track).mkdir()
        bid = make_batch(db_url, tmp_path / track, 4, bad_every=4, tag=track)  # line 1 rejected
        ids[track] = bid
        batches.label_batch(db_url, bid, release_track=track, release_version=version)
        c = claims.claim(db_url, bid, "w", 10, lease_seconds=60)
        assert c is not None and len(c.requests) == 3
        with session(db_url) as s:  # the same canonical bodies in both batches
            for r in c.requests:
                s.get(Request, r.id).cache_digest = f"digest-{r.line_no}"  # type: ignore[union-attr]
        outcomes = [
            claims.Outcome(
                r,
                Reply(
                    ok=True,
                    body=answer(t),
                    completion_tokens=2,
                    latency_ms=10.0,
                    finished_at=time.time(),
                ),
            )
            for r, t in zip(c.requests, texts, strict=True)
        ]
        used = EngineUse("engine", 1.5 if track == "candidate" else 4.0, 3, 0)
        claims.settle(db_url, bid, c, outcomes, 3, used=used)
    assert stats.track_agreement(db_url, "v1", "v2", 0) == (3, 2)
    candidate = stats.track_stats(db_url, "candidate", "v2", 0)
    assert (candidate.batches, candidate.requests, candidate.failed) == (
        1,
        3,
        0,
    )  # rejected line not counted
    assert candidate.p95_ms == 10.0
    assert candidate.engine_seconds == 1.5  # the track's GPU time, not the other's
    with session(db_url) as s:
        assert s.get(Batch, ids["stable"]).release_version == "v1"  # type: ignore[union-attr]


def test_the_worker_loop_rides_through_a_postgresql_restart(tmp_path: Path) -> None:
    """PostgreSQL killed (immediate stop) and back 2 s later: the loop's store reads wait for
    it instead of failing the run."""
    with postgres() as pg:
        db = pg.create_database("outage")
        bid = make_batch(db, tmp_path, 3)
        pg.stop()
        back = threading.Timer(2.0, pg.start)
        back.start()
        started = time.monotonic()
        p = patiently(lambda: results.progress(db, bid), outage_seconds=60)
        back.join()
        assert p.queued == 3
        assert time.monotonic() - started >= 1.5  # it did wait for the restart
        with pytest.raises(OperationalError):  # and gives up after its outage budget
            pg.stop()
            patiently(lambda: results.progress(db, bid), outage_seconds=1)


def test_a_value_too_long_for_its_column_is_refused_not_cut(pg_url: str) -> None:
    """PostgreSQL: a bulk insert (one array per column) refuses a value longer than its
    column, as a row of values did; cast to the column's varchar(n) it would be cut, and two
    values alike in their first n characters would then be one row."""
    from sqlalchemy.exc import DataError

    from offline_queue.store.bulk import insert_ignoring_conflicts
    from offline_queue.store.db import get_engine, migrate
    from offline_queue.store.tables import StreamEntry

    migrate(get_engine(pg_url))
    long = "s" * 300  # stream_entries.reply_to holds 256
    rows = [("st", "a", "1-0", "batch_x", 1, long), ("st", "b", "2-0", "batch_x", 2, "ok")]
    columns = ("stream", "custom_id", "entry_id", "batch_id", "line_no", "reply_to")
    with pytest.raises(DataError, match="too long"), session(pg_url) as s:
        insert_ignoring_conflicts(s.connection(), StreamEntry, columns, rows)
    with session(pg_url) as s:
        assert s.scalar(select(func.count()).select_from(StreamEntry)) == 0
