"""One clock: the store's. A worker whose own clock runs ahead (a node of a cluster whose NTP is
off) neither takes chunks another worker still holds, nor stamps leases, retry times, share
heartbeats or expiry with its own time.

In this process the skew is Python's `time.time()` moved ahead; across processes it is Debian's
`faketime`, which moves every clock call of the worker process but not the PostgreSQL server's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from instruments.faultproxy import FaultProxy
from instruments.processes import BIN, wait_for
from offline_queue.engines.base import Reply
from offline_queue.retry import RetryPolicy
from offline_queue.states import BatchStatus
from offline_queue.store import admission, batches, claims, clock, loops, results
from offline_queue.store.db import session
from offline_queue.store.tables import Batch, Request
from tests.conftest import REPO, cli_env
from tests.test_pipeline import line, write
from tests.test_store import make_batch, submission

CHAT = "/v1/chat/completions"

SKEW = 600.0  # ten minutes: far longer than any lease
FAKETIME = shutil.which("faketime")
REAL_TIME = time.time
"""The clock of the machine that runs the store (PostgreSQL on loopback, SQLite in process):
what the store's stamps are checked against, whatever the code under test reads."""


@pytest.fixture
def ahead(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """Call it to move this process's `time.time()` ten minutes ahead."""

    def skew() -> None:
        monkeypatch.setattr(time, "time", lambda: REAL_TIME() + SKEW)

    return skew


def near(t: float | None, expected: float, within: float = 5.0) -> bool:
    return t is not None and abs(t - expected) < within


def leases(db: str, token: str) -> list[float]:
    with session(db, readonly=True) as s:
        return list(s.scalars(select(Request.lease_expires).where(Request.lease_token == token)))


def test_a_lease_is_judged_and_stamped_by_the_stores_clock(
    db_url: str, tmp_path: Path, ahead: Callable[[], None]
) -> None:
    bid = make_batch(db_url, tmp_path, 20)
    held = claims.claim(db_url, bid, "on-time", 10, lease_seconds=60)
    assert held is not None and len(held.requests) == 10
    ahead()
    late = claims.claim(db_url, bid, "ahead", 20, lease_seconds=60)
    assert late is not None
    assert {r.id for r in late.requests}.isdisjoint({r.id for r in held.requests})
    assert len(late.requests) == 10 and {r.attempts for r in late.requests} == {1}
    assert claims.claim(db_url, bid, "ahead", 20, lease_seconds=60) is None
    # Its own leases are the store's time plus 60 s, not its clock's: nobody waits 11 minutes.
    assert all(near(t, REAL_TIME() + 60) for t in leases(db_url, late.token))
    assert claims.renew_leases(db_url, [late.token], 60) == 10
    assert all(near(t, REAL_TIME() + 60) for t in leases(db_url, late.token))
    with session(db_url, readonly=True) as s:
        assert near(s.execute(select(clock.now())).scalar_one(), REAL_TIME(), 1.0)


def test_retries_are_due_by_the_stores_clock(
    db_url: str, tmp_path: Path, ahead: Callable[[], None]
) -> None:
    bid = make_batch(db_url, tmp_path, 2)
    c = claims.claim(db_url, bid, "w", 10, lease_seconds=60)
    assert c is not None
    busy = Reply.error(503, "engine_unavailable", "busy", retriable=True)
    settled = claims.settle(
        db_url,
        bid,
        c,
        [claims.Outcome(r, busy) for r in c.requests],
        3,
        RetryPolicy(base_seconds=30, cap_seconds=30),
    )
    assert settled.retried == 2
    ahead()  # by this clock the retries are long due; by the store's, 15-45 s to go
    assert claims.claim(db_url, bid, "w", 10, lease_seconds=60) is None
    due_in = results.progress(db_url, bid).due_in
    assert due_in is not None and 10 < due_in <= 45


def test_expiry_and_status_stamps_are_the_stores(
    db_url: str, tmp_path: Path, ahead: Callable[[], None]
) -> None:
    ahead()
    placed = replace(submission("batch_clock", folder=tmp_path), completion_window="24h")
    batch, created = admission.admit_batch(
        db_url,
        replace(placed, tenant="t", input_file_id="file-1", endpoint=CHAT, total_lines=1),
        max_queued=100,
        max_waiting=None,
        window_seconds=60,
    )
    now = REAL_TIME()
    assert created and near(batch.created_at, now) and near(batch.expires_at, now + 60)
    found, expired = batches.get_batch_expired(db_url, "batch_clock")
    assert found is not None and not expired  # our clock says it ended 9 minutes ago
    batches.set_status(db_url, "batch_clock", BatchStatus.IN_PROGRESS)
    batches.request_cancel(db_url, "batch_clock")
    stamped = batches.get_batch(db_url, "batch_clock")
    assert stamped is not None
    assert near(stamped.in_progress_at, now) and near(stamped.cancelling_at, now)
    batches.label_batch(db_url, "batch_clock", expires_at=int(now) - 1)
    assert batches.get_batch_expired(db_url, "batch_clock")[1]
    assert batches.get_batch_expired(db_url, "batch_none") == (None, False)


def test_loop_heartbeats_are_judged_by_the_stores_clock(
    db_url: str, ahead: Callable[[], None]
) -> None:
    loops.join(db_url, "on-time", "node-a", "vllm:m", None, "m@1")
    ahead()
    loops.join(db_url, "ahead", "node-b", "vllm:m", None, "m@1")
    assert sorted(r.id for r in loops.live_loops(db_url)) == ["ahead", "on-time"]
    assert loops.serves(db_url, "vllm:m") and not loops.serves(db_url, "vllm:other")


# --- Across processes: a worker under `faketime`, the PostgreSQL server on the real clock. ---

needs_faketime = pytest.mark.skipif(FAKETIME is None, reason="Debian's faketime is not installed")


_SLEEP_IN_SELECT = (
    "import select, time; time.sleep = lambda s: select.select([], [], [], max(s, 0.0)) and None"
)


def skewed_python(args: list[str], env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """`python args` and its environment under faketime, the wall clock ten minutes ahead.

    Monotonic clocks are left alone: wall time is what two machines disagree on, and with a
    faked monotonic clock Python's timed lock waits never return. Left alone, libfaketime 0.9.10
    rejects an absolute clock_nanosleep on it (EINVAL), which is how `time.sleep` sleeps: the
    child sleeps in select() instead (`args` starts with `-c`, whose code runs after that)."""
    assert FAKETIME is not None and args[0] == "-c"
    code = f"{_SLEEP_IN_SELECT}\n{args[1]}"
    return (
        [FAKETIME, "-f", f"+{int(SKEW)}s", sys.executable, "-c", code, *args[2:]],
        {**env, "FAKETIME_DONT_FAKE_MONOTONIC": "1"},
    )


_CLAIMER = """
import json, sys, time
from sqlalchemy import func, select
from offline_queue.store import claims
from offline_queue.store.db import session
db, bid = sys.argv[1:3]
c = claims.claim(db, bid, "ahead", 100, lease_seconds=60)
with session(db) as s:  # the server's clock, read without the code under test
    store = float(s.execute(select(func.extract("epoch", func.now()))).scalar_one())
print(json.dumps({"clock": time.time(), "store": store,
                  "ids": [r.id for r in c.requests] if c else [],
                  "token": c.token if c else None}))
"""


@needs_faketime
def test_a_worker_ten_minutes_ahead_takes_no_live_lease(pg_url: str, tmp_path: Path) -> None:
    bid = make_batch(pg_url, tmp_path, 20)
    held = claims.claim(pg_url, bid, "on-time", 10, lease_seconds=60)
    assert held is not None
    held_until = max(leases(pg_url, held.token))
    cmd, env = skewed_python(["-c", _CLAIMER, pg_url, bid], dict(os.environ))
    out = subprocess.run(
        cmd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        check=True,
    )
    seen = json.loads(out.stdout)
    # The skew is real in the worker, and not in the server.
    assert SKEW - 30 < seen["clock"] - seen["store"] < SKEW + 30
    assert near(seen["store"], REAL_TIME())
    # By its own clock every lease of the other worker is long over: with time.time() it would
    # have taken them all.
    assert seen["clock"] > held_until
    assert len(seen["ids"]) == 10
    assert set(seen["ids"]).isdisjoint(r.id for r in held.requests)
    assert all(near(t, REAL_TIME() + 60) for t in leases(pg_url, seen["token"]))
    with session(pg_url) as s:
        attempts = set(s.scalars(select(Request.attempts).where(Request.batch_id == bid)))
    assert attempts == {1}


_CLI = (
    "import sys; from offline_queue.cli import app; sys.argv[0] = 'offline-queue'; sys.exit(app())"
)


@pytest.fixture
def counting_proxy(vllm_server: str) -> Iterator[FaultProxy]:
    """The real served engine behind a proxy that counts what reaches it."""
    with FaultProxy(vllm_server.removesuffix("/v1"), lambda _n: "pass") as proxy:
        yield proxy


def _worker(path: Path, db: str, engine: str, env: dict[str, str], ahead: bool) -> Any:
    args = ["run", str(path), "--db", db, "--engine", engine, "--chunk-size", "8", "--json"]
    cmd = [str(BIN / "offline-queue"), *args]
    if ahead:  # the same command as the console script runs it
        cmd, env = skewed_python(["-c", _CLI, *args], env)
    return subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )


def _requests(db: str, path: Path) -> list[tuple[int, str]]:
    with session(db) as s:
        bid = s.scalar(select(Batch.id).where(Batch.input_path == str(path.resolve())))
        rows = s.execute(select(Request.attempts, Request.state).where(Request.batch_id == bid))
        return [(a, st) for a, st in rows]


@needs_faketime
@pytest.mark.usefixtures("prefect_api")
def test_a_worker_ten_minutes_ahead_joins_a_served_batch_and_repeats_nothing(
    counting_proxy: FaultProxy, pg_url: str, prefect_api: str, tmp_path: Path
) -> None:
    n = 240  # time enough for the worker ahead (a slower start, under faketime) to join
    path = write(
        tmp_path / "in.jsonl",
        [line(f"r{i}", max_tokens=16, ignore_eos=True, temperature=0.8) for i in range(n)],
    )
    env = cli_env(prefect_api)
    first = _worker(path, pg_url, counting_proxy.url, env, ahead=False)

    def started() -> bool:
        try:
            return sum(1 for _, state in _requests(pg_url, path) if state == "completed") >= 1
        except Exception:
            return False

    wait_for(lambda: first.poll() is not None or started(), timeout=300, interval=0.2)
    assert first.poll() is None, first.communicate()[1][-2000:]
    second = _worker(path, pg_url, counting_proxy.url, env, ahead=True)
    runs = []
    for p in (first, second):
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        runs.append(json.loads(out)["run"])
    sent = Counter(json.loads(body)["messages"][0]["content"] for body in counting_proxy.bodies)
    sent_total = sum(counting_proxy.bodies.values())
    print(f"inferred: on time {runs[0]['inferred']}, ten minutes ahead {runs[1]['inferred']}")
    assert sent_total == n and len(sent) == n  # no request reached the engine twice
    assert runs[1]["inferred"] > 0, "the worker ahead joined too late to take anything"
    rows = _requests(pg_url, path)
    assert len(rows) == n and {a for a, _ in rows} == {1}  # no lease was taken early
