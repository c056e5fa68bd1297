"""What an operator bills and plans by: the GPU time each batch used (engine-seconds, on the
batch, in `offline-queue gpu-time` and in /metrics, each served engine under a key of its own),
and the finish-time estimate that raises an event before a batch misses its window. The real
vLLM engine on CPU, a real Prefect server."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

from instruments.processes import wait_for
from offline_queue.batches import Kind, batch_object, output_lines, virtual_outputs
from offline_queue.engines.base import Reply
from offline_queue.engines.vllm_local import LocalVLLM
from offline_queue.eta import estimate
from offline_queue.flows.waiting import LATE_EVENT
from offline_queue.gpu_time import chunk_use
from offline_queue.metrics import registry
from offline_queue.serving import serve_claim
from offline_queue.store import admission, batches, claims, ingest
from offline_queue.store.outlook import Outlook
from offline_queue.submission import Submission
from offline_queue.validate import Limits, inspect_file, validate_file
from tests.conftest import run_cli
from tests.test_pipeline import line, write


def chat_file(path: Path, n: int, max_tokens: int) -> Path:
    def counting(i: int) -> dict[str, Any]:
        ask = [{"role": "user", "content": f"Count from {i} to {i + 20}."}]
        return line(f"r{i}", messages=ask, max_tokens=max_tokens, ignore_eos=True)

    return write(path, [counting(i) for i in range(n)])


def admit(db: str, path: Path, tenant: str, window_seconds: int, batch_id: str) -> str:
    """A tenant's batch with a window, created as POST /v1/batches creates it."""
    info = inspect_file(path, Limits())
    placed = Submission(batch_id, info.content_hash, str(path), *virtual_outputs(batch_id))
    batch, created = admission.admit_batch(
        db,
        replace(
            placed,
            tenant=tenant,
            input_file_id=f"file-{batch_id}",
            endpoint="/v1/chat/completions",
            total_lines=info.lines,
            completion_window=f"{window_seconds}s",
        ),
        max_queued=100_000,
        max_waiting=None,
        window_seconds=window_seconds,
    )
    assert created
    return batch.id


@dataclass
class ServedEngine:
    """What `chunk_use` reads of an engine: its key (the replies carry their seconds)."""

    engine_key: str = "http://127.0.0.1:8000/v1#m"


def test_a_served_engine_charges_the_seats_a_chunk_held() -> None:
    """A served engine charges each request its latency over its 32 seats (openai_http.py):
    a chunk keeping every seat busy for 2 s is charged 2 s, one keeping 8, a quarter."""
    replies = [
        Reply(ok=True, body="{}", latency_ms=2000.0, engine_seconds=2.0 / 32) for _ in range(32)
    ]
    engine: Any = ServedEngine()
    assert chunk_use(engine, 2.0, replies).seconds == pytest.approx(2.0)  # every seat: the time
    assert chunk_use(engine, 2.0, replies[:8]).seconds == pytest.approx(0.5)  # a quarter
    assert chunk_use(engine, 1.0, replies).seconds == pytest.approx(1.0)  # never above the wall
    assert chunk_use(engine, 2.0, replies).requests == 32


def test_a_server_on_loopback_is_this_node_s_own_in_the_engine_time() -> None:
    """Every node of a group serves at 127.0.0.1:8000: each node's engine is an engine of its
    own in the engine-time rows and metrics (one key for all would add N engines up as one)."""
    import socket

    from offline_queue.engines.openai_http import engine_key

    here = socket.gethostname()
    assert engine_key("http://127.0.0.1:8000/v1/", "m") == f"{here}:http://127.0.0.1:8000/v1#m"
    assert engine_key("http://localhost:8000/v1", "m").startswith(f"{here}:")
    assert engine_key("http://gpu-1:8000/v1", "m") == "http://gpu-1:8000/v1#m"


def test_the_estimate_counts_urgent_work_ahead_and_says_when_it_is_late() -> None:
    running = Outlook(
        now=1000.0, urgent=100, earlier=500, served=200, tier_requests=0, tier_seconds=0
    )
    e = estimate(pending=300, in_progress_at=900, expires_at=1100, outlook=running)
    assert e.rate == pytest.approx(2.0) and e.ahead == 100  # earlier batches of the tier: no
    assert e.finish_at == pytest.approx(1000 + 400 / 2.0) and e.late
    waiting = Outlook(
        now=1000.0, urgent=0, earlier=500, served=0, tier_requests=600, tier_seconds=300
    )
    e = estimate(pending=100, in_progress_at=None, expires_at=2000, outlook=waiting)
    assert e.ahead == 500 and e.finish_at == pytest.approx(1300) and not e.late
    nothing = Outlook(1000.0, urgent=0, earlier=0, served=0, tier_requests=0, tier_seconds=0)
    assert estimate(pending=5, in_progress_at=None, expires_at=1, outlook=nothing).finish_at is None


def test_gpu_time_matches_the_engine_time_measured_around_the_run(
    pg_url: str, tmp_path: Path, engine: LocalVLLM
) -> None:
    path = chat_file(tmp_path / "in.jsonl", 48, max_tokens=16)
    bid = admit(pg_url, path, "acme", 3600, "batch_usage_acme")
    ingest.ingest(pg_url, bid, validate_file(path, Limits()), group_size=100)
    ingest.finish_ingest(pg_url, bid)

    began = time.monotonic()
    while (claim := claims.claim(pg_url, bid, "usage-test", 8, lease_seconds=60)) is not None:
        serve_claim(pg_url, claim, engine)
    measured = time.monotonic() - began

    env = dict(os.environ)
    shown = run_cli(
        "gpu-time", "--tenant", "acme", "--since", "1h", "--db", pg_url, "--json", env=env
    )
    assert shown.returncode == 0, shown.stderr
    rows = json.loads(shown.stdout)
    assert [r["batch_id"] for r in rows] == [bid] and rows[0]["chunks"] == 6
    used = rows[0]["engine_seconds"]
    # The engine's steps, not the claims, settles and tokenizing around them: a little less
    # than the wall time of the chunks served one after the other.
    assert 0.7 * measured <= used <= measured, (used, measured)
    other = run_cli("gpu-time", "--tenant", "other", "--db", pg_url, "--json", env=env)
    assert json.loads(other.stdout) == []
    table = run_cli("gpu-time", "--tenant", "acme", "--db", pg_url, env=env)
    assert bid in table.stdout and "total" in table.stdout

    batch = batches.get_batch(pg_url, bid)
    assert batch is not None and batch.late_at is None
    assert batch_object(pg_url, batch).engine_seconds == pytest.approx(used, abs=0.01)
    scraped = {
        (s.name, s.labels.get("tenant") or s.labels.get("engine")): s.value
        for family in registry(pg_url).collect()
        for s in family.samples
    }
    assert scraped[("offline_queue_engine_seconds_total", "acme")] >= used - 0.01
    assert scraped[("offline_queue_engine_requests_total", engine.engine_key)] >= 48
    assert scraped[("offline_queue_engine_busy_seconds_total", engine.engine_key)] >= used - 0.01


def test_a_batch_whose_window_is_too_short_raises_the_event_before_it_expires(
    pg_url: str, tmp_path: Path, prefect_api: str, engine: LocalVLLM
) -> None:
    from offline_queue.flows.batch import batch_inference

    path = chat_file(tmp_path / "late.jsonl", 240, max_tokens=16)
    bid = admit(pg_url, path, "hasty", 16, "batch_late_window")
    result = batch_inference(input=str(path), db=pg_url, batch_id=bid, chunk_size=4)

    batch = batches.get_batch(pg_url, bid)
    assert batch is not None and batch.expires_at is not None
    assert result["status"] == "expired"  # too short indeed: the rest was dropped
    assert batch.late_at is not None and batch.late_at < batch.expires_at
    assert not batches.mark_late(pg_url, bid), "a second look at a late batch raises nothing"
    only_ours = EventFilter(
        event=EventNameFilter(name=[LATE_EVENT]),
        resource=EventResourceFilter(id=[f"offline-queue.batch.{bid}"]),
    )
    with get_client(sync_client=True) as client:
        wait_for(
            lambda: client.read_events(only_ours, limit=50).events, timeout=30
        )  # events are sent async
        time.sleep(2)
        found = client.read_events(only_ours, limit=50).events
    assert len(found) == 1, "raised once, however many progress updates saw it late"
    event = found[0]
    assert event.occurred.timestamp() < batch.expires_at
    assert event.payload["estimated_finish_at"] > batch.expires_at
    assert event.resource["offline-queue.tenant"] == "hasty"
    outputs = list(batches_lines(pg_url, bid))
    assert Counter(outputs) == Counter(f"r{i}" for i in range(240))  # every line once


def batches_lines(db: str, batch_id: str) -> list[str]:
    batch = batches.get_batch(db, batch_id)
    assert batch is not None
    kinds: tuple[Kind, ...] = ("output", "errors")
    return [json.loads(x)["custom_id"] for k in kinds for x in output_lines(db, batch, k)]
