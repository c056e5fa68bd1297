"""How operators run it: a Prefect server on PostgreSQL, `pools apply`, `prefect deploy --all`,
a worker, `prefect deployment run --watch`, queue priority, and the nightly schedule."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import psycopg
import pytest
import yaml

from tests.conftest import BIN, REPO, free_port, wait_for
from tests.test_pipeline import line, write

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(pg_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """`prefect server start` on PostgreSQL (loopback, its own PREFECT_HOME); yields the env
    that points Prefect commands at it."""
    name = "prefect_cluster"
    plain = pg_server.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(f"{plain}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_API_DATABASE_CONNECTION_URL=pg_server.replace("+psycopg", "+asyncpg") + f"/{name}",
        PREFECT_UI_ENABLED="false",
        PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2",  # schedule new deployments at once
    )
    log = (home / "server.log").open("wb")
    server = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=home,
    )
    api = f"http://127.0.0.1:{port}/api"

    def healthy() -> bool:
        try:
            return httpx.get(f"{api}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(lambda: server.poll() is not None or healthy(), timeout=180, interval=0.5)
        assert server.poll() is None, (home / "server.log").read_text()[-2000:]
        env.update(PREFECT_API_URL=api, PREFECT_WORKER_QUERY_SECONDS="1")
        yield env
    finally:
        server.terminate()
        server.wait(30)


@contextlib.contextmanager
def api(env: dict[str, str]) -> Iterator[None]:
    """Point this process's Prefect client at the cluster's server for a moment."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        yield


def cmd(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        list(args), env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def test_pools_apply_twice_changes_nothing_and_a_bad_file_nothing_at_all(
    cluster: dict[str, str], pg_url: str, tmp_path: Path
) -> None:
    oq = str(BIN / "offline-queue")
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
    cluster: dict[str, str], pg_url: str, tmp_path: Path, vllm_server: str
) -> None:
    oq = str(BIN / "offline-queue")
    assert cmd(oq, "pools", "apply", "--db", pg_url, env=cluster).returncode == 0
    deployed = cmd(str(BIN / "prefect"), "--no-prompt", "deploy", "--all", env=cluster)
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]

    # The nightly schedule: its next run is 02:00 in Paris.
    nightly = cmd(
        str(BIN / "prefect"), "deployment", "inspect", "batch-inference/nightly", env=cluster
    )
    assert "0 2 * * *" in nightly.stdout and "Europe/Paris" in nightly.stdout
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter

    with api(cluster), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("batch-inference/nightly")
        runs = wait_for(
            lambda: client.read_flow_runs(
                deployment_filter=DeploymentFilter(id={"any_": [deployment.id]})
            ),
            timeout=60,
            interval=1,
        )
    paris = ZoneInfo("Europe/Paris")
    first = min(r.expected_start_time for r in runs).astimezone(paris)
    now = dt.datetime.now(paris)
    assert (first.hour, first.minute) == (2, 0)
    assert dt.timedelta(0) < first - now <= dt.timedelta(days=1)

    worker = subprocess.Popen(
        [oq, "worker", "start", "--group", "cpu-local"],
        env=cluster,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    try:
        _end_to_end(cluster, tmp_path)
        _priority(cluster, tmp_path, vllm_server)
    finally:
        worker.terminate()
        worker.wait(30)


def _end_to_end(env: dict[str, str], tmp_path: Path) -> None:
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


def _priority(env: dict[str, str], tmp_path: Path, server_url: str) -> None:
    """Pool limit 1: with bulk runs queued, a critical run submitted last runs next."""
    from prefect.client.orchestration import get_client
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
            runs[name] = run_deployment(
                f"batch-inference/{deployment}",
                parameters={"input": str(path), "engine": server_url},
                timeout=0,
            ).id
        with get_client(sync_client=True) as client:

            def finished() -> dict | None:
                states = {n: client.read_flow_run(i) for n, i in runs.items()}
                if all(r.state and r.state.is_final() for r in states.values()):
                    return states
                return None

            states = wait_for(finished, timeout=600, interval=2)
    assert all(r.state.is_completed() for r in states.values()), {
        n: r.state for n, r in states.items()
    }
    order = sorted(states, key=lambda n: states[n].start_time)
    print("run order:", order)
    # bulk-1 may have started before the critical run existed; every other bulk run waits.
    assert order.index("critical") <= 1
    crit_end = states["critical"].end_time
    assert all(states[b].start_time >= crit_end for b in order[order.index("critical") + 1 :])
