"""How operators run it: a Prefect server on PostgreSQL, `pools apply`, `prefect deploy --all`,
a worker, `prefect deployment run --watch`, queue priority, and the nightly schedule."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID
from zoneinfo import ZoneInfo

import httpx
import pytest
import yaml

from instruments.postgres import create_database
from instruments.prefect_server import prefect_server
from instruments.processes import BIN, wait_for
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
    store = create_database(pg_server, "oq_cluster_store")
    with prefect_server(
        tmp_path_factory.mktemp("prefect-home"),
        database_url=create_database(pg_server, "prefect_cluster"),
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
def workers(env: dict[str, str], cwd: Path, *groups: str) -> Iterator[None]:
    procs = [
        subprocess.Popen(
            [str(BIN / "offline-queue"), "worker", "start", "--group", g],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=cwd,
        )
        for g in groups
    ]
    try:
        yield
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)


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
    deployed: dict[str, str], tmp_path: Path, vllm_server: str
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

    with workers(cluster, tmp_path, "cpu-local"):
        run_id = _end_to_end(cluster, tmp_path)
        _priority(cluster, tmp_path, vllm_server)
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
    run's page in the Prefect UI and finds the batch's artifacts and its summary table."""
    if not Path(CHROMIUM).exists():
        if os.environ.get("OQ_REQUIRE_BROWSER"):
            pytest.fail(f"{CHROMIUM} is missing (apt-get install chromium)")
        print(f"browser check skipped: no {CHROMIUM}")
        return
    from playwright.sync_api import expect, sync_playwright
    from prefect.client.orchestration import get_client

    with api(env), get_client(sync_client=True) as client:
        run = client.read_flow_run(UUID(run_id))
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
        finally:
            browser.close()
    print(f"Prefect UI screenshots in {ARTIFACTS}")


def _priority(env: dict[str, str], tmp_path: Path, server_url: str) -> None:
    """Pool limit 1: with bulk runs queued, a critical run submitted last runs next."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments import run_deployment

    with api(env):
        runs = {}
        for name, deployment in [
            ("bulk-1", "local-bulk"),
            ("bulk-2", "local-bulk"),
            ("bulk-3", "local-bulk"),
            ("critical", "local-critical"),
        ]:
            path = write(
                tmp_path / f"{name}.jsonl", [line(f"{name}-{i}", max_tokens=4) for i in range(3)]
            )
            started: FlowRun = run_deployment(  # type: ignore[assignment]  # sync: not a coroutine
                f"batch-inference/{deployment}",
                parameters={"input": str(path), "engine": server_url},
                timeout=0,
            )
            runs[name] = started.id
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
    start = {n: r.start_time for n, r in states.items() if r.start_time is not None}
    assert start.keys() == states.keys(), "every completed run has its start time"
    order = sorted(states, key=lambda n: start[n])
    print("run order:", order)
    # bulk-1 may have started before the critical run existed; every other bulk run waits.
    assert order.index("critical") <= 1
    crit_end = states["critical"].end_time
    assert crit_end is not None
    assert all(start[b] >= crit_end for b in order[order.index("critical") + 1 :])


def test_gray_release_routes_stamps_and_rolls_back_by_itself(
    deployed: dict[str, str], tmp_path: Path, vllm_server: str
) -> None:
    from prefect.client.orchestration import get_client
    from sqlalchemy import select

    from blocks.engines import OpenAIServer
    from instruments.faultproxy import FaultProxy
    from offline_queue.store.db import session
    from offline_queue.store.tables import Batch

    env, oq = deployed, str(BIN / "offline-queue")
    store = env["OQ_TEST_STORE"]
    set_policy = cmd(
        oq,
        "release",
        "set",
        "--stable",
        "smol-v1",
        "--stable-engine",
        vllm_server,
        "--candidate",
        "smol-v2",
        "--candidate-engine",
        vllm_server,
        "--stage",
        "internal",
        "--internal-tenants",
        "acme-internal",
        "--min-samples",
        "6",
        env=env,
    )
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

    with workers(env, tmp_path, "cpu-local", "control"):
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
            staged = cmd(
                oq,
                "release",
                "set",
                "--candidate-engine",
                "openai-server/bad-candidate",
                "--stage",
                "full",
                env=env,
            )
            assert staged.returncode == 0, staged.stderr[-2000:]
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
