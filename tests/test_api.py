"""The batch API over real HTTP on loopback, driven by the official `openai` SDK: the round trip,
tenant isolation, 401s, limits, backpressure, idempotency, cancel, expiry, many submitters."""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from instruments.loopback import free_port
from instruments.processes import wait_for
from offline_queue.states import Tier
from offline_queue.store.db import session
from offline_queue.store.tables import Batch
from offline_queue.validate import Limits
from tests.api_helpers import Api, lines_of, serve_api, upload, wait_terminal
from tests.test_pipeline import line, write

pytestmark = pytest.mark.usefixtures("prefect_api")


@pytest.fixture
def api(
    request: pytest.FixtureRequest, tmp_path: Path, pg_url: str, vllm_server: str
) -> Iterator[Api]:
    """`offline-queue api`'s app under uvicorn on loopback, small limits, a real engine, its
    metrics listener on a port of its own. A test may set the standard tier's capacity with
    `indirect` parametrization."""
    from offline_queue.api.settings import ApiSettings

    standard = getattr(request, "param", 40)

    settings = ApiSettings(
        db=pg_url,
        data_dir=tmp_path / "api",
        engine=vllm_server,
        chunk_size=16,
        limits=Limits(max_line_bytes=4096, max_lines=300, max_file_bytes=2_000_000),
        max_queued={Tier.CRITICAL: 1000, Tier.STANDARD: standard, Tier.BULK: 1000},
        metrics_port=free_port(),
    )
    with serve_api(settings) as api:
        yield api


def test_sdk_round_trip(api: Api, tmp_path: Path) -> None:
    client = api.client("acme")
    path = write(tmp_path / "in.jsonl", [line(f"r{i}", max_tokens=6) for i in range(6)] + ["oops"])
    f = upload(client, path)
    assert f.purpose == "batch" and f.bytes == path.stat().st_size
    batch = client.batches.create(
        input_file_id=f.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"tier": "critical", "project": "demo"},
    )
    assert batch.status in ("validating", "in_progress", "completed")
    done = wait_terminal(client, batch.id)
    assert done.status == "completed"
    assert done.request_counts.total == 7 and done.request_counts.completed == 6
    assert done.metadata == {"tier": "critical", "project": "demo"}
    outputs = lines_of(client, done.output_file_id)
    assert sorted(o["custom_id"] for o in outputs) == [f"r{i}" for i in range(6)]
    errors = lines_of(client, done.error_file_id)
    assert len(errors) == 1 and "line 7: not JSON" in errors[0]["error"]["message"]
    listed = client.batches.list(limit=10)
    assert [b.id for b in listed.data] == [batch.id]
    served = [m.id for m in client.models.list()]
    assert "smollm2" in served and client.models.retrieve(served[0]).id == served[0]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-nobody-serves")
    # Prometheus scrapes the metrics listener, without a key: the batch's results, from the store
    assert api.metrics is not None
    scraped = httpx.get(api.metrics, timeout=30)
    assert scraped.status_code == 200, scraped.text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(scraped.text)
        for s in family.samples
    }
    mine = {
        k: v
        for k, v in samples.items()
        if k[0] == "offline_queue_results_total" and ("batch", batch.id) in k[1]
    }
    completed = sum(v for k, v in mine.items() if ("outcome", "completed") in k[1])
    failed = sum(v for k, v in mine.items() if ("outcome", "failed") in k[1])
    assert (completed, failed) == (6, 1), mine


def test_tenants_are_isolated_and_keys_required(api: Api, tmp_path: Path) -> None:
    a, b = api.client("tenant-a"), api.client("tenant-b")
    f = upload(a, write(tmp_path / "a.jsonl", [line("x", max_tokens=2)]))
    batch = a.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    with pytest.raises(openai.NotFoundError):
        b.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        b.batches.cancel(batch.id)
    with pytest.raises(openai.NotFoundError):
        b.files.retrieve(f.id)
    with pytest.raises(openai.NotFoundError):
        b.files.content(f.id)
    with pytest.raises(openai.NotFoundError):  # B cannot start a batch on A's file either
        b.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    assert b.batches.list().data == []
    wait_terminal(a, batch.id)
    with pytest.raises(openai.NotFoundError):
        b.files.content(f"{batch.id}-output")

    bad = openai.OpenAI(base_url=api.url, api_key="oq-not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.batches.list()
    assert httpx.get(f"{api.url}/batches").status_code == 401


def test_limits_and_backpressure(api: Api, tmp_path: Path) -> None:
    client = api.client("acme")
    long_line = write(
        tmp_path / "long.jsonl", [line("x", messages=[{"role": "user", "content": "y" * 5000}])]
    )
    with pytest.raises(openai.APIStatusError) as err:
        upload(client, long_line)
    assert err.value.status_code == 413 and "max_line_bytes" in str(err.value)
    many = write(tmp_path / "many.jsonl", [line(f"m{i}") for i in range(301)])
    with pytest.raises(openai.BadRequestError, match="max_lines"):
        upload(client, many)

    # The standard tier takes 40 waiting requests; a 30-line batch fits, a second one does not.
    f = upload(
        client, write(tmp_path / "thirty.jsonl", [line(f"t{i}", max_tokens=2) for i in range(30)])
    )
    first = client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    with pytest.raises(openai.RateLimitError) as refused:
        client.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    assert refused.value.response.headers["retry-after"]
    with session(api.db) as s:  # nothing half-created
        assert s.scalar(select(func.count()).select_from(Batch)) == 1
    # Once the tier has room again, the same Idempotency-Key returns the same batch.
    wait_terminal(client, first.id)
    k1 = client.batches.create(
        input_file_id=f.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        extra_headers={"Idempotency-Key": "nightly-7"},
    )
    k2 = client.batches.create(
        input_file_id=f.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        extra_headers={"Idempotency-Key": "nightly-7"},
    )
    assert k1.id == k2.id
    wait_terminal(client, k1.id)


def test_cancel_and_expiry_deliver_what_finished(api: Api, tmp_path: Path) -> None:
    client = api.client("acme")
    items = [line(f"c{i}", max_tokens=24, ignore_eos=True, temperature=0.7) for i in range(200)]
    f = upload(client, write(tmp_path / "big.jsonl", items))
    meta = {"tier": "bulk"}
    batch = client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h", metadata=meta
    )

    def completed() -> int:
        counts = client.batches.retrieve(batch.id).request_counts
        return counts.completed if counts else 0

    wait_for(lambda: completed() >= 16, timeout=120)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    done = wait_terminal(client, batch.id)
    assert done.status == "cancelled" and done.cancelled_at
    outputs, errors = lines_of(client, done.output_file_id), lines_of(client, done.error_file_id)
    ids = Counter(o["custom_id"] for o in outputs + errors)
    assert len(ids) == 200 and set(ids.values()) == {1}
    assert 16 <= len(outputs) < 200
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}

    expiring = client.batches.create(
        input_file_id=f.id,
        endpoint="/v1/chat/completions",
        # The SDK types the window as OpenAI's only one, "24h"; this server takes any duration.
        completion_window="4s",  # type: ignore[arg-type]
        metadata=meta,
    )
    done = wait_terminal(client, expiring.id)
    assert done.status == "expired" and done.expired_at
    outputs, errors = lines_of(client, done.output_file_id), lines_of(client, done.error_file_id)
    assert len(outputs) + len(errors) == 200 and len(errors) > 0
    assert {e["error"]["code"] for e in errors} == {"batch_expired"}


# A small tier (10 requests: five batches of two, plus each tenant's first) keeps the number of
# accepted batches, and so the test's time, small; the refusals are what it is about.
@pytest.mark.parametrize("api", [10], indirect=True)
def test_a_hundred_concurrent_submitters(api: Api, tmp_path: Path) -> None:
    keys = [api.key(f"t{i % 10}") for i in range(100)]
    path = write(tmp_path / "two.jsonl", [line("a", max_tokens=2), line("b", max_tokens=2)])
    body = path.read_bytes()
    results: list[tuple[int, str | None]] = []
    lock = threading.Lock()

    def submit(key: str) -> None:
        with httpx.Client(
            base_url=api.url, headers={"Authorization": f"Bearer {key}"}, timeout=60
        ) as c:
            f = c.post("/files", files={"file": ("two.jsonl", body)}, data={"purpose": "batch"})
            assert f.status_code == 200, f.text
            r = c.post(
                "/batches",
                json={
                    "input_file_id": f.json()["id"],
                    "endpoint": "/v1/chat/completions",
                    "completion_window": "24h",
                },
            )
            with lock:
                results.append((r.status_code, r.json().get("id")))

    threads = [threading.Thread(target=submit, args=(k,)) for k in keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    codes = Counter(code for code, _ in results)
    assert len(results) == 100 and set(codes) <= {200, 429}, codes
    accepted = [bid for code, bid in results if code == 200]
    assert codes[200] > 0 and codes[429] > 0  # the tier filled up and refused the rest
    assert len(set(accepted)) == len(accepted)
    with session(api.db) as s:
        stored = set(s.scalars(select(Batch.id)))
    assert stored == set(accepted)  # none lost, none extra
    wait_for(
        lambda: all(b.status == "completed" for b in _batches(api.db)), timeout=300, interval=1
    )
    with session(api.db) as s:  # every accepted batch answered both of its lines, once
        from offline_queue.store.tables import Result

        per_batch = Counter(s.scalars(select(Result.batch_id).where(Result.ok)))
    assert per_batch == dict.fromkeys(accepted, 2)


def _batches(db: str) -> list[Batch]:
    with session(db) as s:
        return list(s.scalars(select(Batch)))


def test_cli_against_the_api_and_the_store(api: Api, tmp_path: Path, prefect_api: str) -> None:
    from tests.conftest import cli_env, run_cli

    env = cli_env(
        prefect_api, OFFLINE_QUEUE_API_KEY=api.key("cli-tenant"), OFFLINE_QUEUE_API=api.url
    )
    path = write(tmp_path / "cli.jsonl", [line(f"q{i}", max_tokens=4) for i in range(4)])
    submitted = run_cli("submit", str(path), "--tier", "critical", "--wait", env=env)
    assert submitted.returncode == 0, submitted.stderr[-2000:]
    batch_id = submitted.stdout.splitlines()[0].strip()
    assert batch_id.startswith("batch_") and "completed" in submitted.stdout

    listed = run_cli("status", env=env)
    assert batch_id in listed.stdout and "completed" in listed.stdout
    out, err = tmp_path / "o.jsonl", tmp_path / "e.jsonl"
    fetched = run_cli("results", batch_id, "-o", str(out), "--errors", str(err), env=env)
    assert fetched.returncode == 0, fetched.stderr
    assert sorted(json.loads(x)["custom_id"] for x in out.read_text().splitlines()) == [
        f"q{i}" for i in range(4)
    ]
    assert err.read_text() == ""
    assert "completed" in run_cli("cancel", batch_id, env=env).stdout  # too late: it stays done

    # The same batch read straight from the store, with no API in between.
    store_env = {k: v for k, v in env.items() if k != "OFFLINE_QUEUE_API"}
    direct = run_cli("status", batch_id, "--db", api.db, "--json", env=store_env)
    assert json.loads(direct.stdout.splitlines()[-1])["status"] == "completed"
    other = api.client("someone-else")
    with pytest.raises(openai.NotFoundError):
        other.batches.retrieve(batch_id)
