"""What an operator sees: a real Prometheus (Debian's, started here on loopback) scrapes the API's
metrics listener while a batch runs, PromQL answers with that batch's completed count and its
tier's pending count, and every query of the Grafana dashboard and every alert rule is one
Prometheus accepts, on metric names /metrics really exposes (so neither can rot). An idle store
shows every tier and served model at 0; the API's own port has no /metrics; promtool checks the
rules and tests that each fires when it should."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
import uuid
from itertools import product
from pathlib import Path

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select, update

from instruments.faultproxy import FaultProxy
from instruments.loopback import free_port, healthy
from instruments.processes import BIN, serving, wait_for
from instruments.prometheus import Prometheus, Sample, prometheus, prometheus_bin, promtool_bin
from offline_queue.catalog import DEFAULT_CATALOG, ServedModel
from offline_queue.metrics import listener
from offline_queue.states import LIVE_STATES, RequestState, Tier
from offline_queue.store import batches, loops
from offline_queue.store.db import session
from offline_queue.store.tables import Request, ServingLoop
from offline_queue.submission import Submission
from tests.api_helpers import serve_api, upload, wait_terminal
from tests.conftest import REPO, cli_env
from tests.test_pipeline import line, write

DASHBOARD = REPO / "deployments" / "grafana" / "offline-queue.json"
ALERTS = REPO / "deployments" / "grafana" / "alerts.yml"
LINES, CHUNK = 32, 8
TIERS = [t.value for t in Tier]
BUNDLED = [m.name for m in DEFAULT_CATALOG.models]
Scraped = dict[tuple[str, tuple[tuple[str, str], ...]], float]
"""A scrape's samples: (sample name, its labels sorted) → value."""


def installed(binary: str | None, name: str) -> str:
    """`binary`, Debian's `prometheus` package's (`make test` installs it as root); without it
    the test is skipped, unless OQ_REQUIRE_PROMETHEUS says it must not be."""
    if binary is None:
        if os.environ.get("OQ_REQUIRE_PROMETHEUS"):
            pytest.fail(f"{name} is missing (apt-get install prometheus)")
        pytest.skip(f"no {name} (Debian's `prometheus` package; `make test` installs it as root)")
    return binary


def scrape(url: str) -> tuple[str, Scraped]:
    """GET /metrics: its text and its samples."""
    response = httpx.get(url, timeout=30)
    assert response.status_code == 200, response.text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }
    return response.text, samples


def exported(text: str) -> set[str]:
    """Every family /metrics exposes, with the sample names a query uses (`_total`, `_bucket`)."""
    names: set[str] = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.M):
        names.add(name)
        names.update({"counter": [f"{name}_total"], "histogram": [f"{name}_bucket"]}.get(kind, []))
    return names


def sample(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted(labels.items()))


def live(db: str, batch_id: str) -> dict[str, int]:
    """The batch's queued and processing requests, counted in the store itself."""
    with session(db, readonly=True) as s:
        rows = s.execute(
            select(Request.state, func.count())
            .where(Request.batch_id == batch_id, Request.state.in_(LIVE_STATES))
            .group_by(Request.state)
        )
        return {str(state): int(n) for state, n in rows}


def scraped_after(prom: Prometheus, moment: float) -> None:
    """Until Prometheus holds a scrape that began after `moment` (wall clock)."""
    wait_for(lambda: (prom.value("max(timestamp(up))") or 0) > moment, timeout=15)


@pytest.mark.usefixtures("prefect_api")
@pytest.mark.skipif(
    prometheus_bin() is None and not os.environ.get("OQ_REQUIRE_PROMETHEUS"),
    reason="no prometheus (Debian's `prometheus` package; `make test` installs it as root)",
)
def test_prometheus_scrapes_a_running_batch_and_the_dashboard_queries_and_alert_rules_parse(
    tmp_path: Path, pg_url: str, vllm_server: str
) -> None:
    from offline_queue.api.settings import ApiSettings

    installed(prometheus_bin(), "prometheus")
    # The first chunk passes; the next is held at the proxy: the batch is frozen mid-run, with
    # figures in the store that do not move while Prometheus scrapes them.
    plan = lambda n: "pass" if n < CHUNK else "hold"  # noqa: E731
    with FaultProxy(vllm_server.removesuffix("/v1"), plan) as proxy:
        settings = ApiSettings(
            db=pg_url,
            data_dir=tmp_path / "api",
            engine=proxy.url,
            chunk_size=CHUNK,
            metrics_port=free_port(),
        )
        with serve_api(settings) as api:
            assert api.metrics is not None
            with prometheus(api.metrics, rules=ALERTS) as prom:
                client = api.client("acme")
                path = write(
                    tmp_path / "in.jsonl", [line(f"r{i}", max_tokens=4) for i in range(LINES)]
                )
                batch = client.batches.create(
                    input_file_id=upload(client, path).id,
                    endpoint="/v1/chat/completions",
                    completion_window="24h",
                    metadata={"tier": "bulk"},
                )
                completed = (
                    f'sum(offline_queue_results_total{{batch="{batch.id}",outcome="completed"}})'
                )
                pending = 'sum(offline_queue_requests{tier="bulk",state="pending"})'
                processing = 'sum(offline_queue_requests{tier="bulk",state="processing"})'

                wait_for(lambda: prom.value(completed) == CHUNK, timeout=30, interval=0.5)
                # The second chunk is held, and the third, claimed behind it once all of it is
                # sent (the overlap, flows/chunks.py), is held too: then nothing moves.
                wait_for(
                    lambda: live(pg_url, batch.id).get(RequestState.PROCESSING) == 2 * CHUNK,
                    timeout=30,
                )
                frozen = live(pg_url, batch.id)
                scraped_after(prom, time.time())
                assert frozen == {"queued": LINES - 3 * CHUNK, "processing": 2 * CHUNK}
                assert live(pg_url, batch.id) == frozen  # nothing moved while it was scraped
                assert prom.value(pending) == LINES - 3 * CHUNK
                assert prom.value(processing) == 2 * CHUNK
                assert prom.value(completed) == CHUNK

                proxy.release()
                assert wait_terminal(client, batch.id, timeout=120).status == "completed"
                scraped_after(prom, time.time())
                assert prom.value(completed) == LINES
                assert prom.value(pending) == 0  # no live request left in the tier: 0, not none

                exposed, _ = scrape(api.metrics)
                check_dashboard(prom, exposed)
                # Prometheus evaluated every alert rule on the real figures, without an error.
                rules = prom.rules()
                assert len(rules) == len(re.findall(r"^\s+- alert: ", ALERTS.read_text(), re.M))
                assert {r["name"]: (r["health"], r.get("lastError", "")) for r in rules} == {
                    r["name"]: ("ok", "") for r in rules
                }


def check_dashboard(prom: Prometheus, exposed: str) -> None:
    """Every panel's query, with its template variables set to all (`.*`) and to a real value,
    is accepted by Prometheus; every metric it names is one /metrics exposes."""
    names = exported(exposed)

    dashboard = json.loads(DASHBOARD.read_text())
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["tier", "tenant"]
    targets = [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p["targets"]]
    assert len(targets) >= 10
    answers: dict[str, list[Sample]] = {}
    for values in ({"tier": ".*", "tenant": ".*"}, {"tier": "bulk", "tenant": "acme"}):
        for title, expr in targets:
            for var, value in {**values, "__rate_interval": "1m", "__range": "1h"}.items():
                expr = expr.replace(f"${var}", value)
            assert "$" not in expr, expr
            answers[title] = prom.query(expr)  # QueryError unless Prometheus answers success
            assert set(re.findall(r"offline_queue_\w+", expr)) <= names, expr
    # With the batch's own tier and tenant selected, the panels show it.
    assert answers["Batches by status"] == [({"status": "completed"}, 1.0)]
    assert {labels["outcome"] for labels, _ in answers["Throughput by outcome"]} == {"completed"}


def test_an_idle_store_shows_every_tier_and_served_model_at_zero(db_url: str) -> None:
    team = ServedModel(name="team-llm", engine="http://127.0.0.1:9/v1")
    catalog = DEFAULT_CATALOG.with_entries([team])
    with listener(db_url, "127.0.0.1", 0, lambda: catalog) as port:
        _, got = scrape(f"http://127.0.0.1:{port}/metrics")
    for tier in TIERS:
        for model, state in product([*BUNDLED, "team-llm"], ("pending", "processing")):
            assert got[sample("offline_queue_requests", tier=tier, state=state, model=model)] == 0
        for direction in ("prompt", "completion"):
            assert got[sample("offline_queue_tokens_total", tier=tier, direction=direction)] == 0
        assert got[sample("offline_queue_oldest_pending_age_seconds", tier=tier)] == 0
        assert got[sample("offline_queue_batches_late", tier=tier)] == 0
    # Closed with the block, its thread joined: nothing listens, nothing is left running.
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    assert not [t for t in threading.enumerate() if "serve_forever" in t.name]


def test_loops_and_late_batches_are_counted_beside_their_zeros(db_url: str) -> None:
    route = "vllm:smollm2"
    loops.join(db_url, "loop-up", "gpu-1", route, None, "smollm2@0123456789ab")
    loops.join(db_url, "loop-down", "gpu-2", route, None, "smollm2@0123456789ab")
    with session(db_url) as s:  # its last beat a minute ago, and it never left: it crashed
        stopped = ServingLoop.heartbeat - 60
        s.execute(
            update(ServingLoop).where(ServingLoop.id == "loop-down").values(heartbeat=stopped)
        )
    bid = f"batch_{uuid.uuid4().hex[:24]}"
    sub = Submission(bid, uuid.uuid4().hex, "/in", "/out", "/err", tier=Tier.BULK)
    batches.register_batch(db_url, sub)
    assert batches.mark_late(db_url, bid)

    with listener(db_url, "127.0.0.1", 0) as port:
        _, got = scrape(f"http://127.0.0.1:{port}/metrics")
    assert got[sample("offline_queue_serving_loops", route=route, node="gpu-1", state="serving")]
    assert (
        got[sample("offline_queue_serving_loops", route=route, node="gpu-1", state="draining")] == 0
    )
    assert got[sample("offline_queue_serving_loops_lost", route=route, node="gpu-1")] == 0
    assert (
        got[sample("offline_queue_serving_loops", route=route, node="gpu-2", state="serving")] == 0
    )
    assert got[sample("offline_queue_serving_loops_lost", route=route, node="gpu-2")] == 1
    for tier in TIERS:
        assert got[sample("offline_queue_pending_requests", route=route, tier=tier)] == 0
        assert got[sample("offline_queue_batches_late", tier=tier)] == (tier == Tier.BULK)
    assert got[sample("offline_queue_batches_unserved", route=route)] == 0
    version = sample("offline_queue_request_latency_seconds_count", model="smollm2@0123456789ab")
    assert got[version] == 0


def listening(pid: int) -> set[int]:
    """The TCP ports the process listens on."""
    connections = psutil.Process(pid).net_connections(kind="tcp")
    return {c.laddr.port for c in connections if c.status == psutil.CONN_LISTEN}


@pytest.mark.parametrize("own_port", [True, False], ids=["metrics-port", "metrics-port-0"])
def test_api_serve_keeps_metrics_off_its_port_on_a_listener_of_its_own(
    own_port: bool, pg_url: str, prefect_api: str, tmp_path: Path
) -> None:
    from offline_queue.api.auth import create_key

    port, metrics_port = free_port(), free_port() if own_port else 0
    key = create_key(pg_url, "acme")
    cmd = [str(BIN / "offline-queue"), "api", "serve", "--port", str(port), "--db", pg_url]
    cmd += ["--data-dir", str(tmp_path / "api"), "--metrics-port", str(metrics_port)]
    api = f"http://127.0.0.1:{port}"
    ready = lambda: healthy(f"{api}/health")  # noqa: E731
    env = cli_env(prefect_api)
    with serving(cmd, ready, tmp_path / "api.log", timeout=120, env=env, cwd=REPO) as proc:
        for headers in ({}, {"Authorization": f"Bearer {key}"}):
            answer = httpx.get(f"{api}/metrics", headers=headers, timeout=10)
            assert answer.status_code == 404, answer.text
            assert "offline_queue" not in answer.text
        assert httpx.get(f"{api}/v1/models", headers={"Authorization": f"Bearer {key}"}).is_success
        if own_port:
            assert listening(proc.pid) == {port, metrics_port}
            text, got = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
            assert "offline_queue_requests" in exported(text)
            for model in BUNDLED:
                labels = {"tier": "critical", "state": "pending", "model": model}
                assert got[sample("offline_queue_requests", **labels)] == 0
        else:
            assert listening(proc.pid) == {port}  # --metrics-port 0: nothing more is open
    # Shut down on SIGTERM (uvicorn then ends by the signal it caught), not killed after the grace.
    assert proc.returncode in (0, -signal.SIGTERM), (tmp_path / "api.log").read_text()[-2000:]
    if own_port:
        with pytest.raises(httpx.ConnectError):  # the listener went with the API
            httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5)


def test_the_alert_rules_pass_promtool_fire_when_they_should_and_name_exported_metrics(
    pg_url: str, tmp_path: Path
) -> None:
    promtool = installed(promtool_bin(), "promtool")
    checked = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 5 rules found" in checked.stdout, checked.stdout

    cases = tmp_path / "alerts.test.yml"  # JSON is YAML
    cases.write_text(json.dumps(RULE_TESTS | {"rule_files": [str(ALERTS)]}))
    tested = subprocess.run([promtool, "test", "rules", str(cases)], capture_output=True, text=True)
    assert tested.returncode == 0, tested.stdout + tested.stderr

    with listener(pg_url, "127.0.0.1", 0) as port:
        text, _ = scrape(f"http://127.0.0.1:{port}/metrics")
    named = set(re.findall(r"offline_queue_\w+", ALERTS.read_text()))
    assert named and named <= exported(text), named - exported(text)


def firing(alert: str, at: str, labels: dict[str, str], **annotations: str) -> dict[str, object]:
    return {
        "eval_time": at,
        "alertname": alert,
        "exp_alerts": [{"exp_labels": labels, "exp_annotations": annotations}],
    }


RULE_TESTS: dict[str, object] = {
    "evaluation_interval": "1m",
    "tests": [
        {
            "interval": "1m",
            "input_series": [
                # Critical work waits from minute 1 on (600 s, then a minute more each minute);
                # bulk work has waited far longer, which is no page.
                {
                    "series": 'offline_queue_oldest_pending_age_seconds{tier="critical"}',
                    "values": "0 600+60x20",
                },
                {
                    "series": 'offline_queue_oldest_pending_age_seconds{tier="bulk"}',
                    "values": "5000+60x20",
                },
                {
                    "series": 'offline_queue_serving_loops_lost{route="vllm:smollm2",node="gpu-2"}',
                    "values": "0 0 1x20",
                },
                {"series": 'offline_queue_batches_late{tier="standard"}', "values": "0x5 1x20"},
                {"series": 'offline_queue_batches_late{tier="bulk"}', "values": "0x20"},
                {"series": 'offline_queue_batches_unserved{route="gpu-a100"}', "values": "0 1x20"},
            ],
            "alert_rule_test": [
                # Past 900 s from minute 7 (960 s), for 5 minutes: firing at 12, not at 11.
                {"eval_time": "11m", "alertname": "OfflineQueueCriticalBacklog", "exp_alerts": []},
                firing(
                    "OfflineQueueCriticalBacklog",
                    "12m",
                    {"severity": "critical", "tier": "critical"},
                    summary="Critical requests have been queued for 21m 0s",
                    description="The oldest pending critical request's batch was created 21m 0s "
                    'ago. See offline_queue_pending_requests{tier="critical"} for the route it '
                    "waits on and offline_queue_serving_loops for who serves it.",
                ),
                {"eval_time": "2m", "alertname": "OfflineQueueServingLoopLost", "exp_alerts": []},
                firing(
                    "OfflineQueueServingLoopLost",
                    "3m",
                    {"severity": "warning", "route": "vllm:smollm2", "node": "gpu-2"},
                    summary="A serving loop of vllm:smollm2 on gpu-2 stopped serving",
                    description="1 serving loop(s) of route vllm:smollm2 on node gpu-2 stopped "
                    "beating without leaving. `offline-queue worker loops` shows the live ones.",
                ),
                {"eval_time": "7m", "alertname": "OfflineQueueBatchLate", "exp_alerts": []},
                firing(
                    "OfflineQueueBatchLate",
                    "8m",
                    {"severity": "warning", "tier": "standard"},
                    summary="1 standard batch(es) will finish after their window",
                    description="1 unfinished standard batch(es) are estimated to finish after "
                    "their completion window; what is not done when it passes is dropped as "
                    "expired.",
                ),
                {"eval_time": "10m", "alertname": "OfflineQueueRouteUnserved", "exp_alerts": []},
                firing(
                    "OfflineQueueRouteUnserved",
                    "11m",
                    {"severity": "warning", "route": "gpu-a100"},
                    summary="1 batch(es) wait on gpu-a100 with no serving loop",
                ),
                {"eval_time": "20m", "alertname": "OfflineQueueMetricsAbsent", "exp_alerts": []},
            ],
        },
        {
            # A store nobody scrapes: no series at all, not even the zeros.
            "interval": "1m",
            "input_series": [{"series": "up", "values": "0x10"}],
            "alert_rule_test": [
                {"eval_time": "4m", "alertname": "OfflineQueueMetricsAbsent", "exp_alerts": []},
                firing(
                    "OfflineQueueMetricsAbsent",
                    "5m",
                    {"severity": "warning", "tier": "critical"},
                    summary="No offline-queue figures: the metrics listener or its store is down",
                ),
            ],
        },
    ],
}
