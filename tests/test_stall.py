"""No batch stalls in silence: a run that fails, is killed with -9, or is cancelled in Prefect
leaves its batch `failed` with the reason in `errors` (seen through the `openai` SDK and
`offline-queue status`), and a re-run of the same batch resumes it to the end."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from instruments.faultproxy import FaultProxy
from instruments.loopback import free_port, healthy
from instruments.processes import BIN, wait_for
from offline_queue.states import TERMINAL_STATUSES, BatchStatus, RequestState
from offline_queue.store import batches, claims, owners
from offline_queue.store.db import session
from offline_queue.store.tables import Batch, Request
from tests.api_helpers import Api, serve_api
from tests.conftest import REPO, cli_env, run_cli
from tests.test_cli import custom_ids
from tests.test_cluster import api as prefect_at
from tests.test_cluster import cluster, deployed, workers  # noqa: F401  # fixtures
from tests.test_pipeline import line, write
from tests.test_store import make_batch, submission

LEASE = 3.0


def _batch(db: str, batch_id: str) -> Batch:
    batch, _ = batches.register_batch(db, submission(batch_id))
    return batch


def _errors(db: str, batch_id: str) -> list[dict[str, Any]]:
    batch = batches.get_batch(db, batch_id)
    assert batch is not None and batch.errors_json
    errors: list[dict[str, Any]] = json.loads(batch.errors_json)
    return errors


def test_the_reaper_settles_silent_owners_only(db_url: str, tmp_path: Path) -> None:
    """Lost: an owner silent past its lease with nobody working. Not lost: a batch waiting for
    its run to start, an owner still beating, a request lease still alive. A re-run reopens."""
    for bid in ("lost", "waiting", "alive"):
        _batch(db_url, bid)
    leased = make_batch(db_url, tmp_path, 3)
    owners.take_ownership(db_url, "lost", "run-a on host-1 (pid 7)", None, 0.2)
    owners.await_run(db_url, "waiting", "flow-run-1", "Prefect flow run x, waiting")
    owners.take_ownership(db_url, "alive", "run-b", None, 60.0)
    owners.take_ownership(db_url, leased, "run-c", None, 0.2)
    assert claims.claim(db_url, leased, "worker-c", 10, lease_seconds=60.0) is not None
    time.sleep(0.5)

    reaped = owners.reap_orphans(db_url, grace_seconds=0.1)
    assert [r.batch_id for r in reaped] == ["lost"]
    (error,) = _errors(db_url, "lost")
    assert error["code"] == owners.RUN_LOST
    assert "run-a on host-1 (pid 7)" in error["message"] and "last seen" in error["message"]
    for bid in ("waiting", "alive", leased):
        b = batches.get_batch(db_url, bid)
        claimed = BatchStatus.IN_PROGRESS if bid == leased else BatchStatus.VALIDATING
        assert b is not None and b.status == claimed, bid
    assert owners.reap_orphans(db_url, grace_seconds=0.1) == []  # settled once

    # A re-run takes the lost batch back: no longer failed, no error left, a live owner.
    assert owners.take_ownership(db_url, "lost", "run-d", None, 60.0)
    b = batches.get_batch(db_url, "lost")
    assert b is not None and b.status == BatchStatus.VALIDATING and b.errors_json is None
    assert b.owner == "run-d" and b.failed_at is None
    # A batch that failed for its requests is over: a run does not reopen it.
    batches.set_status(db_url, "alive", BatchStatus.FAILED, errors_json='[{"code": "x"}]')
    assert not owners.take_ownership(db_url, "alive", "run-e", None, 60.0)
    # A flow run's end fails the batch it owns, and not one another run has taken since.
    owners.take_ownership(db_url, "waiting", "flow run 2", "flow-run-2", 60.0)
    assert owners.fail_run(db_url, owners.RUN_CANCELLED, "x", run_id="flow-run-1") == []
    assert owners.fail_run(db_url, owners.RUN_CANCELLED, "y", run_id="flow-run-2") == ["waiting"]


@pytest.fixture
def broken_api(tmp_path: Path, pg_url: str, prefect_api: str) -> Iterator[Api]:
    """The API's app under uvicorn, its runs on an engine that cannot be built (no model)."""
    from offline_queue.api.settings import ApiSettings

    settings = ApiSettings(
        db=pg_url, data_dir=tmp_path / "api", model=str(tmp_path / "no-such-model")
    )
    with serve_api(settings) as api:
        yield api


def _create(client: openai.OpenAI, path: Path) -> Any:
    with path.open("rb") as f:
        uploaded = client.files.create(file=f, purpose="batch")
    return client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )


@pytest.mark.vllm  # the run builds the in-process engine, which fails on the missing model
def test_a_run_that_raises_in_the_api_fails_its_batch_with_the_reason(
    broken_api: Api, tmp_path: Path
) -> None:
    client = broken_api.client("acme")
    batch = _create(client, write(tmp_path / "in.jsonl", [line(f"r{i}") for i in range(3)]))
    done: Any = wait_for(  # the SDK's Batch
        lambda: (b := client.batches.retrieve(batch.id)).status in TERMINAL_STATUSES and b,
        timeout=120,
        interval=0.5,
    )
    assert done.status == "failed"
    assert done.errors is not None and done.errors.data
    error = done.errors.data[0]
    assert error.code == owners.RUN_FAILED
    assert "not a model folder" in (error.message or ""), error.message


def _status(db: str, batch_id: str, env: dict[str, str]) -> dict[str, Any]:
    shown = run_cli("status", batch_id, "--db", db, "--json", env=env, timeout=120)
    assert shown.returncode == 0, shown.stderr[-2000:]
    status: dict[str, Any] = json.loads(shown.stdout.strip().splitlines()[-1])
    return status


def test_kill_9_of_the_api_leaves_a_failed_batch_that_a_rerun_completes(
    tmp_path: Path, pg_url: str, prefect_api: str, vllm_server: str
) -> None:
    """`offline-queue api serve` runs a batch whose engine never answers (a stalling proxy)
    and is killed with -9 mid-chunk: after one lease `status` shows it failed, `run_lost`,
    naming the API process; `offline-queue run` of the same batch resumes it to completed."""
    env = cli_env(prefect_api)
    total = 12
    path = write(tmp_path / "in.jsonl", [line(f"k{i}", max_tokens=4) for i in range(total)])
    port = free_port()
    with FaultProxy(vllm_server.removesuffix("/v1"), lambda n: "stall", stall_seconds=600) as hang:
        api = subprocess.Popen(
            [
                str(BIN / "offline-queue"),
                "api",
                "serve",
                "--port",
                str(port),
                "--db",
                pg_url,
                "--engine",
                hang.url,
                "--data-dir",
                str(tmp_path / "api"),
                "--lease-seconds",
                str(LEASE),
                "--metrics-port",
                "0",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=REPO,
        )
        try:
            wait_for(lambda: healthy(f"http://127.0.0.1:{port}/health"), timeout=60)
            from offline_queue.api.auth import create_key

            client = openai.OpenAI(
                base_url=f"http://127.0.0.1:{port}/v1",
                api_key=create_key(pg_url, "acme"),
                max_retries=0,
            )
            batch_id = _create(client, path).id
            wait_for(lambda: hang.seen["stall"] > 0, timeout=180)  # a chunk is in flight
            seen = _status(pg_url, batch_id, env)
            assert seen["status"] == "in_progress" and not seen["errors"]
        finally:
            os.kill(api.pid, signal.SIGKILL)
            api.wait()
        killed = time.monotonic()

        # Reaped by whoever looks next (here `status`), once the owner is silent past its lease.
        lost = wait_for(
            lambda: (s := _status(pg_url, batch_id, env))["status"] == "failed" and s,
            timeout=60,
            interval=1,
        )
    assert time.monotonic() - killed >= LEASE
    (error,) = lost["errors"]["data"]
    assert error["code"] == owners.RUN_LOST
    assert f"pid {api.pid}" in error["message"] and "last seen" in error["message"]

    stored = batches.get_batch(pg_url, batch_id)
    assert stored is not None
    again = run_cli(
        "run",
        stored.input_path,
        "--batch-id",
        batch_id,
        "--db",
        pg_url,
        "--engine",
        vllm_server,
        "--json",
        env=env,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    done = json.loads(again.stdout.strip().splitlines()[-1])
    assert done["status"] == "completed" and not done["errors"]
    assert done["request_counts"] == {"total": total, "completed": total, "failed": 0}
    # The batch came through the API: its files are its result rows, fetched as a user would.
    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    fetched = run_cli(
        "results", batch_id, "-o", str(out), "--errors", str(err), "--db", pg_url, env=env
    )
    assert fetched.returncode == 0, fetched.stderr[-3000:]
    ids = custom_ids(str(out), str(err))
    assert ids.keys() == {f"k{i}" for i in range(total)} and set(ids.values()) == {1}
    with session(pg_url) as s:
        left = s.query(Request).filter(Request.state != RequestState.COMPLETED).count()
    assert left == 0


@pytest.mark.slow
def test_cancel_of_a_deployment_run_in_prefect_fails_its_batch_with_the_reason(
    request: pytest.FixtureRequest, tmp_path: Path, vllm_server: str
) -> None:
    """A deployment's run on a worker (`offline-queue worker start`), cancelled through the
    Prefect API as the UI's Cancel does while a loop has its chunk in flight: the worker stops
    the flow's process and runs its on_cancellation hook, and the batch ends `failed` with
    `run_cancelled` naming the flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments import run_deployment
    from prefect.states import Cancelling
    from sqlalchemy import select

    env: dict[str, str] = request.getfixturevalue("deployed")  # test_cluster's, imported
    store = env["OQ_TEST_STORE"]
    path = write(tmp_path / "cancel.jsonl", [line(f"c{i}", max_tokens=4) for i in range(4)])

    def batch() -> Batch | None:
        with session(store) as s:
            return s.scalar(select(Batch).where(Batch.input_path == str(path)))

    with (
        contextlib.ExitStack() as stack,
        FaultProxy(vllm_server.removesuffix("/v1"), lambda n: "stall", stall_seconds=600) as hang,
        prefect_at(env),
    ):
        # The node's loop serves the hanging server (no engine of its own to load).
        stack.enter_context(workers(env, tmp_path, "cpu-local", flags=("--engine", hang.url)))
        started: FlowRun = run_deployment(  # type: ignore[assignment]  # sync: not a coroutine
            "batch-inference/local",
            parameters={"input": str(path), "engine": hang.url},
            timeout=0,
        )
        wait_for(lambda: hang.seen["stall"] > 0, timeout=300, interval=1)
        running = batch()
        assert running is not None and running.status == BatchStatus.IN_PROGRESS
        assert running.owner_run_id == str(started.id)
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(started.id, Cancelling(message="cancelled by a test"))
            ended = wait_for(
                lambda: (
                    (r := client.read_flow_run(started.id)).state and r.state.is_final() and r.state
                ),
                timeout=120,
                interval=1,
            )
        assert ended and ended.is_cancelled(), ended
        failed = wait_for(
            lambda: (b := batch()) is not None and b.status == BatchStatus.FAILED and b,
            timeout=60,
            interval=1,
        )
    assert failed
    (error,) = json.loads(failed.errors_json or "[]")
    assert error["code"] == owners.RUN_CANCELLED
    assert str(started.id) in error["message"], error["message"]
