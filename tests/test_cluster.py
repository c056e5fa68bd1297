"""How operators run it: a Prefect server on PostgreSQL, `pools apply`, `prefect deploy --all`,
a worker, `prefect deployment run --watch`, queue priority, the nightly schedule, and the API
on one machine starting runs that a worker on another (a simulated node) executes.

One file on purpose: every test shares one module-scoped Prefect server on PostgreSQL with the
pools applied and the project deployed (the `cluster` and `deployed` fixtures)."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID
from zoneinfo import ZoneInfo

import httpx
import pytest
import yaml

from instruments.loopback import free_port, healthy
from instruments.nodes import INSTALLED, Cluster, Node, namespaces_refused, vllm_model_info_cache
from instruments.postgres import create_database
from instruments.prefect_server import prefect_server
from instruments.processes import BIN, stop, wait_for
from tests.api_helpers import Api, lines_of, wait_terminal
from tests.conftest import REPO
from tests.test_pipeline import line, write

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
# Without the networking flags Chromium keeps dialing Google's hosts, refused on a closed network.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(os.environ.get("OQ_TEST_ARTIFACTS", REPO / "test-artifacts"))


@pytest.fixture(scope="module")
def cluster(pg_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """`prefect server start` on PostgreSQL (loopback, its own PREFECT_HOME); yields the env
    that points Prefect commands at it."""
    # Names of their own: another module's instance of this fixture (test_stall.py uses it)
    # may still have a session open on its databases while it is torn down.
    suffix = uuid.uuid4().hex[:8]
    store = create_database(pg_server, f"oq_cluster_store_{suffix}")
    with prefect_server(
        tmp_path_factory.mktemp("prefect-home"),
        database_url=create_database(pg_server, f"prefect_cluster_{suffix}"),
        ui=True,  # the browser test looks at it
        PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2",  # schedule new deployments at once
    ) as env:
        env.update(PREFECT_WORKER_QUERY_SECONDS="1", OQ_TEST_STORE=store)
        yield env


@contextlib.contextmanager
def api(env: dict[str, str]) -> Iterator[None]:
    """Point this process's Prefect client at the cluster's server for a moment."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        yield


@pytest.fixture(scope="module")
def deployed(cluster: dict[str, str]) -> dict[str, str]:
    """Pools applied (the store block pointing at the cluster's store) and `prefect deploy
    --all` done, as an operator would from a fresh clone."""
    applied = cmd(
        str(BIN / "offline-queue"), "pools", "apply", "--db", cluster["OQ_TEST_STORE"], env=cluster
    )
    assert applied.returncode == 0, applied.stderr[-2000:]
    deployed = cmd(str(BIN / "prefect"), "--no-prompt", "deploy", "--all", env=cluster)
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    return cluster


@contextlib.contextmanager
def workers(
    env: dict[str, str],
    cwd: Path | None,
    *groups: str,
    node: Node | None = None,
    log: Path | None = None,
    flags: tuple[str, ...] = (),
) -> Iterator[None]:
    """`offline-queue worker start --group G [flags]` for each group: here, or in `node` (with
    `env` pointed at the node's private places, `cwd` as the node sees it, default its HOME).
    Their output goes to `log` (a file here, even for a node's workers), else nowhere."""
    with log.open("ab") if log else open(os.devnull, "wb") as out:

        def start(group: str) -> subprocess.Popen[bytes]:
            command = [str(BIN / "offline-queue"), "worker", "start", "--group", group, *flags]
            streams: dict[str, Any] = {"stdout": out, "stderr": subprocess.STDOUT}
            if node is not None:
                return node.popen(command, env=node.env(env), cwd=cwd, **streams)
            return subprocess.Popen(command, env=env, cwd=cwd, **streams)

        procs = [start(g) for g in groups]
        try:
            yield
        finally:
            stop(*procs)


LOOP = [str(BIN / "offline-queue"), "worker", "loop"]


@contextlib.contextmanager
def loops(env: dict[str, str], *engines: str, log: Path | None = None) -> Iterator[None]:
    """A serving loop for each engine (`offline-queue worker loop --engine E`, as a node of a
    group with that engine runs), on the cluster's store: batches routed to those engines are
    served by them."""
    with log.open("ab") if log else open(os.devnull, "wb") as out:
        procs = [
            subprocess.Popen(
                [*LOOP, "--engine", engine, "--db", env["OQ_TEST_STORE"], "--chunk-size", "8"],
                env=env,
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
            for engine in engines
        ]
        try:
            yield
        finally:
            stop(*procs)


def cmd(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        list(args), env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def test_pools_apply_twice_changes_nothing_and_a_bad_file_nothing_at_all(
    cluster: dict[str, str], tmp_path: Path
) -> None:
    oq = str(BIN / "offline-queue")
    pg_url = cluster["OQ_TEST_STORE"]
    first = cmd(oq, "pools", "apply", "--db", pg_url, env=cluster)
    assert first.returncode == 0, first.stderr[-2000:]
    second = cmd(oq, "pools", "apply", "--db", pg_url, env=cluster)
    assert second.returncode == 0 and "0 changed" in second.stdout, second.stdout[-2000:]

    shown = cmd(oq, "pools", "show", env=cluster).stdout
    rows = [r.split("│")[1:-1] for r in shown.splitlines() if "cpu-local" in r]
    queues = [(c[2].strip(), int(c[3])) for c in rows]
    assert queues[:3] == [("critical", 1), ("standard", 2), ("bulk", 3)]

    bad = yaml.safe_load((REPO / "deployments" / "pools.yaml").read_text())
    bad["groups"]["new-group"] = {**bad["groups"]["cpu-local"], "concurrency_limit": 0}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    refused = cmd(oq, "pools", "apply", str(path), env=cluster)
    assert refused.returncode == 2
    assert "groups.new-group.concurrency_limit" in refused.stderr
    bad["groups"]["new-group"]["concurrency_limit"] = 1
    bad["groups"]["new-group"]["engine"] = {"block": "vllm/x", "type": "vllm", "dtype": 3}
    path.write_text(yaml.safe_dump(bad))
    refused = cmd(oq, "pools", "apply", str(path), env=cluster)
    assert refused.returncode == 2 and "groups.new-group.engine.dtype" in refused.stderr
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    # Nothing was half-applied.
    with api(cluster), get_client(sync_client=True) as client, pytest.raises(ObjectNotFound):
        client.read_work_pool("new-group")


def test_deploy_worker_and_deployment_run_end_to_end(
    deployed: dict[str, str], tmp_path: Path
) -> None:
    cluster = deployed
    # The nightly schedule: its next run is 02:00 in Paris.
    nightly = cmd(
        str(BIN / "prefect"), "deployment", "inspect", "batch-inference/nightly", env=cluster
    )
    assert "0 2 * * *" in nightly.stdout and "Europe/Paris" in nightly.stdout
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with api(cluster), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("batch-inference/nightly")
        runs = wait_for(
            lambda: client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
            ),
            timeout=60,
            interval=1,
        )
    paris = ZoneInfo("Europe/Paris")
    starts = [r.expected_start_time for r in runs]
    assert None not in starts, "a scheduled run has its expected start time"
    # As a stdlib datetime in Paris: Prefect's own DateTime does not subtract a datetime.
    first = dt.datetime.fromtimestamp(min(t.timestamp() for t in starts if t is not None), paris)
    now = dt.datetime.now(paris)
    assert (first.hour, first.minute) == (2, 0)
    assert dt.timedelta(0) < first - now <= dt.timedelta(days=1)

    # Chunks of 32: the loop holds at most 8 of them (256 requests), so of the 600 bulk
    # requests of the priority check some still wait in the queue when the critical batch
    # arrives (chunks of 256 took them all at once).
    with workers(cluster, tmp_path, "cpu-local", flags=("--chunk-size", "32")):
        run_id = _end_to_end(cluster, tmp_path)
        _priority(cluster, tmp_path)
    _prefect_ui_shows_the_batch(cluster, run_id)


def _end_to_end(env: dict[str, str], tmp_path: Path) -> str:
    """`prefect deployment run --watch` of a small batch; returns the flow run's id."""
    path = write(tmp_path / "batch.jsonl", [line(f"d{i}", max_tokens=6) for i in range(5)])
    started = time.monotonic()
    ran = cmd(
        str(BIN / "prefect"),
        "deployment",
        "run",
        "batch-inference/local",
        "--param",
        f"input={path}",
        "--param",
        "tenant=acme",
        "--watch",
        env=env,
        timeout=600,
    )
    assert ran.returncode == 0, ran.stdout[-3000:]
    print(f"deployment run --watch: {time.monotonic() - started:.0f} s")
    outputs = [json.loads(x) for x in path.with_name("batch.output.jsonl").read_text().splitlines()]
    assert sorted(o["custom_id"] for o in outputs) == [f"d{i}" for i in range(5)]
    assert "Completed" in ran.stdout
    found = re.search(r"UUID: ([0-9a-f-]{36})", ran.stdout)
    assert found, ran.stdout[-2000:]
    return found.group(1)


def _prefect_ui_shows_the_batch(env: dict[str, str], run_id: str) -> None:
    """Headless Chromium (Debian's, driven by Playwright; no browser download) opens the flow
    run's page in the Prefect UI and finds the batch's artifacts, its summary table and its
    infer-chunk task runs, then the node's serving-loop run and its table of what it served."""
    if not Path(CHROMIUM).exists():
        if os.environ.get("OQ_REQUIRE_BROWSER"):
            pytest.fail(f"{CHROMIUM} is missing (apt-get install chromium)")
        print(f"browser check skipped: no {CHROMIUM}")
        return
    from playwright.sync_api import expect, sync_playwright
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with api(env), get_client(sync_client=True) as client:
        run = client.read_flow_run(UUID(run_id))
        (loop_run, *_) = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["serving-loop"]))
        )
    batch_id = next(t.removeprefix("batch:") for t in run.tags if t.startswith("batch:"))
    key = batch_id.replace("_", "-").lower()
    ui = env["PREFECT_API_URL"].removesuffix("/api")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1600})
            page.goto(f"{ui}/runs/flow-run/{run_id}")
            expect(page.get_by_text(run.name).first).to_be_visible(timeout=60_000)
            expect(page.get_by_text("Completed").first).to_be_visible()
            page.get_by_text("Artifacts", exact=True).first.click()  # the run page's tab
            # Task runs' artifacts sit in a virtual scroller: drawn only once scrolled to.
            page.get_by_text("Task runs", exact=True).scroll_into_view_if_needed()
            for what in ("progress", "summary", "files"):
                expect(page.get_by_text(f"{key}-{what}", exact=True)).to_be_visible(timeout=30_000)
            page.screenshot(path=ARTIFACTS / "prefect-ui-flow-run-artifacts.png", full_page=True)
            # The summary card opens the table: the counts the store has.
            page.get_by_text(f"{key}-summary", exact=True).click()
            table = page.get_by_role("table")
            expect(table).to_contain_text("completed")
            row = table.get_by_role("row").filter(has_text="requests")
            expect(row).to_contain_text("5")
            page.screenshot(path=ARTIFACTS / "prefect-ui-batch-summary.png", full_page=True)
            # The run graph's chunks: infer-chunk task runs the node's loop served.
            page.goto(f"{ui}/runs/flow-run/{run_id}")
            page.get_by_text(re.compile(r"^Task Runs", re.I)).first.click()
            expect(page.get_by_text("infer-chunk-1").first).to_be_visible(timeout=30_000)
            page.screenshot(path=ARTIFACTS / "prefect-ui-batch-chunks.png", full_page=True)
            # The loop's own run: what it served, as a table artifact.
            page.goto(f"{ui}/runs/flow-run/{loop_run.id}")
            expect(page.get_by_text(loop_run.name).first).to_be_visible(timeout=60_000)
            page.get_by_text("Artifacts", exact=True).first.click()
            expect(page.get_by_text(re.compile(r"^serving-loop-")).first).to_be_visible(
                timeout=30_000
            )
            page.screenshot(path=ARTIFACTS / "prefect-ui-serving-loop.png", full_page=True)
        finally:
            browser.close()
    print(f"Prefect UI screenshots in {ARTIFACTS}")


def _priority(env: dict[str, str], tmp_path: Path) -> None:
    """The node's one loop busy with three bulk batches when a critical batch's run is created:
    its run starts beside them (the limits count batches), the loop takes its chunks ahead of
    the bulk ones, and its requests are answered before the last of every bulk batch that
    still had requests waiting in the queue when it was queued — with the engine the node
    loaded once. (A bulk batch whose last requests are already in the engine may end first:
    critical work goes ahead of waiting work, not of running work; docs/scheduling.md.)"""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments import run_deployment
    from sqlalchemy import func, select

    from offline_queue.states import RequestState
    from offline_queue.store.db import session
    from offline_queue.store.tables import Batch, Request, Result

    store = env["OQ_TEST_STORE"]
    paths: dict[str, Path] = {}

    def start(name: str, deployment: str, n: int) -> UUID:
        paths[name] = write(
            tmp_path / f"{name}.jsonl",
            [line(f"{name}-{i}", max_tokens=32, ignore_eos=True) for i in range(n)],
        )
        started: FlowRun = run_deployment(  # type: ignore[assignment]  # sync: not a coroutine
            f"batch-inference/{deployment}", parameters={"input": str(paths[name])}, timeout=0
        )
        return started.id

    def stored(name: str) -> Batch | None:
        with session(store) as s:
            return s.scalar(select(Batch).where(Batch.input_path == str(paths[name])))

    with api(env):
        # 600 requests: more than the engine runs at once (~240 on this CPU build).
        runs = {f"bulk-{k}": start(f"bulk-{k}", "local-bulk", 200) for k in range(3)}
        wait_for(lambda: (b := stored("bulk-0")) is not None and b.in_progress_at, timeout=300)
        created = time.time()
        runs["critical"] = start("critical", "local-critical", 4)

        def rows(name: str, *states: RequestState) -> int:
            batch = stored(name)
            if batch is None:
                return 0
            count = select(func.count()).select_from(Request).where(Request.batch_id == batch.id)
            if states:
                count = count.where(Request.state.in_(states))
            with session(store) as s:
                return s.scalar(count) or 0

        # Once the critical batch's 4 rows are in the queue, a bulk batch's queued rows can
        # only shrink: whatever is still queued now was waiting when the critical rows arrived.
        wait_for(lambda: rows("critical") == 4, timeout=300, interval=0.2)
        waiting = {n: rows(n, RequestState.QUEUED) for n in runs if n != "critical"}
        with get_client(sync_client=True) as client:

            def finished() -> dict[str, FlowRun] | None:
                states = {n: client.read_flow_run(i) for n, i in runs.items()}
                if all(r.state and r.state.is_final() for r in states.values()):
                    return states
                return None

            states = wait_for(finished, timeout=600, interval=2)
            assert states is not None  # wait_for returns a truthy value or raises
    assert all(r.state and r.state.is_completed() for r in states.values()), {
        n: r.state for n, r in states.items()
    }
    ended = {n: b.completed_at or 0 for n in runs if (b := stored(n)) is not None}
    assert 0 not in ended.values() and len(ended) == 4
    crit = stored("critical")
    assert crit is not None and crit.in_progress_at is not None
    print(
        f"critical: served {crit.in_progress_at - created:.1f} s after its run was created; "
        f"done {ended['critical'] - created:.0f} s after; bulk done "
        f"{sorted(round(ended[n] - created) for n in runs if n != 'critical')} s after"
    )
    behind = [n for n, left in waiting.items() if left > 0]
    print(f"bulk requests still queued when the critical batch was: {waiting}")
    # 600 bulk requests, more than the engine runs at once: the loop claims a chunk only when
    # none of the engine's requests waits, so at least one bulk batch is still queued.
    assert behind, waiting

    def last_answer(name: str) -> float:
        """When the engine finished the batch's last request (the node's one clock): a batch's
        end also waits on its own run's process to finalize, which no queue orders."""
        batch = stored(name)
        assert batch is not None
        with session(store) as s:
            done = s.scalar(select(func.max(Result.finished_at)).where(Result.batch_id == batch.id))
        return float(done or 0)

    answered = {n: last_answer(n) for n in runs}
    assert all(answered["critical"] <= answered[n] for n in behind), (answered, waiting)


def test_gray_release_routes_stamps_and_rolls_back_by_itself(
    deployed: dict[str, str], tmp_path: Path, vllm_server: str
) -> None:
    from prefect.client.orchestration import get_client
    from sqlalchemy import select

    from instruments.faultproxy import FaultProxy
    from offline_queue.blocks.engines import OpenAIServer
    from offline_queue.store.db import session
    from offline_queue.store.tables import Batch

    env, oq = deployed, str(BIN / "offline-queue")
    store = env["OQ_TEST_STORE"]
    engines = ["--stable-engine", vllm_server, "--candidate-engine", vllm_server]
    versions = ["--stable", "smol-v1", "--candidate", "smol-v2"]
    stage = ["--stage", "internal", "--internal-tenants", "acme-internal", "--min-samples", "6"]
    set_policy = cmd(oq, "release", "set", *versions, *engines, *stage, env=env)
    assert set_policy.returncode == 0, set_policy.stderr[-2000:]
    routed = cmd(oq, "release", "route", "--key", "acme-internal", "--key", "globex", env=env)
    assert routed.stdout.splitlines() == [
        "acme-internal candidate smol-v2 internal tenant acme-internal",
        "globex stable smol-v1 stage internal: tenant not on the internal list",
    ]

    def route_run(name: str, tenant: str, n: int) -> Batch:
        path = write(
            tmp_path / f"{name}.jsonl", [line(f"{name}-{i}", max_tokens=4) for i in range(n)]
        )
        ran = cmd(
            str(BIN / "prefect"),
            "deployment",
            "run",
            "route-batch/default",
            "--param",
            f"input={path}",
            "--param",
            f"tenant={tenant}",
            "--watch",
            env=env,
            timeout=600,
        )
        assert ran.returncode == 0, ran.stdout[-3000:]
        with session(store) as s:
            batch = s.scalar(select(Batch).where(Batch.input_path == str(path)))
        assert batch is not None
        return batch

    # Both tracks' engines are the server: the node's one loop serves that route (no engine of
    # its own to load; the candidate's own route gets its loop below, once its block exists).
    with (
        workers(env, tmp_path, "cpu-local", flags=("--engine", vllm_server)),
        workers(env, tmp_path, "control"),
    ):
        internal = route_run("internal", "acme-internal", 5)
        assert (internal.release_track, internal.release_version) == ("candidate", "smol-v2")
        assert internal.status == "completed" and internal.model_version  # the engine's weights
        other = route_run("other", "globex", 3)
        assert (other.release_track, other.release_version) == ("stable", "smol-v1")

        # A candidate whose server answers every request with a 500: after the minimum sample
        # the router rolls the release back, says why, and new batches go to stable.
        with FaultProxy(vllm_server.removesuffix("/v1"), lambda n: "500") as proxy:
            with api(env):
                OpenAIServer(base_url=proxy.url, max_attempts=1).save(
                    "bad-candidate", overwrite=True
                )
            bad_candidate = "--candidate-engine openai-server/bad-candidate --stage full"
            staged = cmd(oq, "release", "set", *bad_candidate.split(), env=env)
            assert staged.returncode == 0, staged.stderr[-2000:]
            with loops(env, "openai-server/bad-candidate"):
                bad = route_run("bad", "globex", 8)
        assert bad.release_track == "candidate"
        shown = cmd(oq, "release", "show", env=env).stdout
        assert "stage" in shown and " off" in shown.split("stage", 1)[1].splitlines()[0]
        after = route_run("after", "globex", 2)
        assert after.release_track == "stable"

    with api(env), get_client(sync_client=True) as client:
        artifacts = client.read_artifacts()
        rollback = [a for a in artifacts if a.key == "release-default-rollback"]
        assert rollback and "error rate" in str(rollback[0].data)
    events = httpx.post(
        f"{env['PREFECT_API_URL']}/events/filter",
        json={"filter": {"event": {"name": ["offline-queue.release.rolled-back"]}}},
        timeout=10,
    ).json()
    assert events["events"], events


@contextlib.contextmanager
def api_serve(env: dict[str, str], store: str, data_dir: Path, log: Path) -> Iterator[str]:
    """`offline-queue api serve --deployment batch-inference/local` on this machine; yields its
    /v1 URL once its /health answers and stops it at the end."""
    port = free_port()
    command = [str(BIN / "offline-queue"), "api", "serve", "--deployment", "batch-inference/local"]
    command += ["--db", store, "--port", str(port), "--data-dir", str(data_dir)]
    command += ["--metrics-port", "0"]  # no fixed port: another API may hold 9464
    with log.open("wb") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)

    def answers() -> bool:
        assert proc.poll() is None, log.read_text()[-3000:]
        return healthy(f"http://127.0.0.1:{port}/health")

    try:
        wait_for(answers, timeout=120, interval=0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop(proc)


def _inputs(tag: str) -> dict[str, bytes]:
    """Three small uploads as users write them: one plain, one without a final newline (as
    many editors save), one with CRLF line ends and a line the batch refuses."""

    def requests(prefix: str, n: int) -> list[str]:
        return [json.dumps(line(f"{tag}-{prefix}-{i}", max_tokens=6)) for i in range(n)]

    crlf = requests("crlf", 3)
    bad = line(f"{tag}-crlf-bad", max_tokens=6)
    del bad["body"]["messages"]  # refused at validation: an error line, not a request
    crlf.insert(1, json.dumps(bad))
    return {
        "plain": "".join(x + "\n" for x in requests("plain", 3)).encode(),
        "no-final-newline": "\n".join(requests("nonl", 4)).encode(),
        "crlf": "".join(x + "\r\n" for x in crlf).encode(),
    }


def test_sdk_batches_through_the_api_run_on_a_worker_in_another_node(
    deployed: dict[str, str], tmp_path: Path, model_dir: Path
) -> None:
    """The front door across machines: the API on this host, the worker on node `gpu-1` (its
    own /tmp, HOME and host name; the model installed there as on a GPU node), nothing shared
    but PostgreSQL and the Prefect server. The `openai` SDK uploads, creates, waits and
    downloads: every custom_id exactly once, every body an openai ChatCompletion."""
    refused = namespaces_refused()
    if refused:
        pytest.skip(f"this kernel or user cannot make namespaces: {refused}")
    from openai.types import BatchError
    from openai.types.chat import ChatCompletion

    from offline_queue.store import batches

    env, store = deployed, deployed["OQ_TEST_STORE"]
    inputs = _inputs(uuid.uuid4().hex[:8])
    data_dir = tmp_path / "api"
    started = time.monotonic()
    with (
        Cluster() as machines,
        api_serve(env, store, data_dir, tmp_path / "api.log") as url,
    ):
        # The bundled model folder is installed on the node (read-only) at its default place,
        # which the node's own HOME would hide: the deployment runs with its defaults.
        gpu = machines.node("gpu-1", installed=(*INSTALLED, model_dir, *vllm_model_info_cache()))
        assert gpu.run(["test", "-e", str(data_dir)]).returncode == 1  # the API's disk
        client = Api(url, store).client("acme")
        ids: dict[str, str] = {}
        with workers(env, None, "cpu-local", node=gpu, log=tmp_path / "worker.log"):
            for name, raw in inputs.items():
                uploaded = client.files.create(file=(f"{name}.jsonl", raw), purpose="batch")
                assert uploaded.bytes == len(raw)
                ids[name] = client.batches.create(
                    input_file_id=uploaded.id,
                    endpoint="/v1/chat/completions",
                    completion_window="24h",
                ).id
            try:
                done = {name: wait_terminal(client, bid, timeout=420) for name, bid in ids.items()}
            except TimeoutError:
                states = {n: batches.get_batch(store, b) for n, b in ids.items()}
                shown = {n: (b.status, b.owner, b.errors_json) for n, b in states.items() if b}
                worker_log = (tmp_path / "worker.log").read_text(errors="replace")[-4000:]
                api_log = (tmp_path / "api.log").read_text(errors="replace")[-2000:]
                pytest.fail(f"not all terminal: {shown}\nworker:\n{worker_log}\napi:\n{api_log}")
        print(f"3 batches through the API on a node: {time.monotonic() - started:.0f} s")

        for name, batch in done.items():
            stored = batches.get_batch(store, batch.id)
            assert stored is not None
            assert batch.status == "completed", (name, batch.errors, stored.owner)
            assert stored.owner and " on gpu-1 (pid " in stored.owner, stored.owner
            outputs = lines_of(client, batch.output_file_id)
            errors = lines_of(client, batch.error_file_id) if batch.error_file_id else []
            seen = Counter(o["custom_id"] for o in outputs + errors)
            wanted = [json.loads(x)["custom_id"] for x in inputs[name].decode().splitlines()]
            assert seen == Counter(wanted), (name, seen)
            for out in outputs:
                assert out["error"] is None and out["response"]["status_code"] == 200
                completion = ChatCompletion.model_validate(out["response"]["body"])
                assert completion.choices and completion.usage
            assert all(e["response"] is None for e in errors)
            messages = [BatchError.model_validate(e["error"]).message or "" for e in errors]
            assert len(messages) == (name == "crlf"), messages
            assert all("line 2" in m and "messages" in m for m in messages), messages
            counts = batch.request_counts
            assert counts and (counts.total, counts.failed) == (len(wanted), len(errors))

        # What the node ran needed no file from the API's disk, and kept none of the uploads.
        uploads = {len(raw): raw for raw in inputs.values()}
        for root in (gpu.path("/tmp"), gpu.path(gpu.home)):
            for path in root.rglob("*"):
                if path.is_file() and path.stat().st_size in uploads:
                    assert path.read_bytes() != uploads[path.stat().st_size], path
    assert not [p for p in data_dir.rglob("*") if p.is_file()]
