"""What an operator sees: a real Prometheus (Debian's, started here on loopback) scrapes the API's
/metrics while a batch runs, PromQL answers with that batch's completed count and its tier's
pending count, and every query of the Grafana dashboard is one Prometheus accepts, on metric
names /metrics really exposes (so the dashboard cannot rot)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from instruments.faultproxy import FaultProxy
from instruments.processes import wait_for
from instruments.prometheus import Prometheus, Sample, prometheus, prometheus_bin
from offline_queue.states import LIVE_STATES, RequestState
from offline_queue.store.db import session
from offline_queue.store.tables import Request
from tests.api_helpers import serve_api, upload, wait_terminal
from tests.test_pipeline import line, write

pytestmark = [
    pytest.mark.usefixtures("prefect_api"),
    pytest.mark.skipif(
        prometheus_bin() is None,
        reason="no prometheus binary (Debian's `prometheus`; `make test` installs it as root)",
    ),
]

DASHBOARD = Path(__file__).resolve().parents[1] / "deployments" / "grafana" / "offline-queue.json"
LINES, CHUNK = 32, 8


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


def test_prometheus_scrapes_a_running_batch_and_the_dashboard_queries_parse(
    tmp_path: Path, pg_url: str, vllm_server: str
) -> None:
    from offline_queue.api.settings import ApiSettings

    # The first chunk passes; the next is held at the proxy: the batch is frozen mid-run, with
    # figures in the store that do not move while Prometheus scrapes them.
    plan = lambda n: "pass" if n < CHUNK else "hold"  # noqa: E731
    with FaultProxy(vllm_server.removesuffix("/v1"), plan) as proxy:
        settings = ApiSettings(
            db=pg_url, data_dir=tmp_path / "api", engine=proxy.url, chunk_size=CHUNK
        )
        with serve_api(settings) as api:
            base = api.url.removesuffix("/v1")
            with prometheus(f"{base}/metrics") as prom:
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
                assert prom.value(pending) is None  # no live request left in the tier

                exposed = httpx.get(f"{base}/metrics", timeout=10).text
                check_dashboard(prom, exposed)


def check_dashboard(prom: Prometheus, exposed: str) -> None:
    """Every panel's query, with its template variables set to all (`.*`) and to a real value,
    is accepted by Prometheus; every metric it names is one /metrics exposes."""
    names: set[str] = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", exposed, flags=re.M):
        names.add(name)
        names.update({"counter": [f"{name}_total"], "histogram": [f"{name}_bucket"]}.get(kind, []))

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
