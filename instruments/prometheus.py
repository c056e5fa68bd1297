"""A Prometheus server of our own on loopback, scraping one loopback target every second, for
tests that check what an operator would see: the real scraper and the real PromQL engine on our
/metrics, not a parser of its text."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from instruments.loopback import free_port, healthy
from instruments.processes import serving

Sample = tuple[dict[str, str], float]
"""One series of a query's answer: its labels and its value."""

SCRAPE_SECONDS = 1


def prometheus_bin() -> str | None:
    """Debian's `prometheus` (`make test` installs it when it can), or None."""
    found = shutil.which("prometheus")
    if found is None and Path("/usr/bin/prometheus").is_file():  # PATH without /usr/bin
        found = "/usr/bin/prometheus"
    return found


class QueryError(RuntimeError):
    """Prometheus refused a query (a PromQL syntax or type error): its errorType and error."""


@dataclass
class Prometheus:
    url: str
    """http://127.0.0.1:PORT, the HTTP API's root."""

    def query(self, expr: str) -> list[Sample]:
        """An instant query; raises QueryError when Prometheus does not answer `success`."""
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        answer = response.json()
        if answer.get("status") != "success":
            raise QueryError(f"{expr!r}: {answer.get('errorType')}: {answer.get('error')}")
        data = answer["data"]
        if data["resultType"] in ("scalar", "string"):
            return [({}, float(data["result"][1]))]
        if data["resultType"] == "matrix":  # a range selector: the newest value of each series
            return [(r["metric"], float(r["values"][-1][1])) for r in data["result"] if r["values"]]
        return [(r["metric"], float(r["value"][1])) for r in data["result"]]

    def value(self, expr: str) -> float | None:
        """The value of a query that yields at most one series; None when it yields none."""
        samples = self.query(expr)
        if len(samples) > 1:
            raise QueryError(f"{expr!r}: {len(samples)} series, expected at most one")
        return samples[0][1] if samples else None


def scrape_config(target: str, metrics_path: str) -> dict[str, object]:
    return {
        "global": {
            "scrape_interval": f"{SCRAPE_SECONDS}s",
            "scrape_timeout": f"{SCRAPE_SECONDS}s",  # may not exceed the interval
            "evaluation_interval": f"{SCRAPE_SECONDS}s",
        },
        "scrape_configs": [
            {
                "job_name": "offline-queue",
                "metrics_path": metrics_path,
                "static_configs": [{"targets": [target]}],
            }
        ],
    }


@contextlib.contextmanager
def prometheus(target_url: str) -> Iterator[Prometheus]:
    """Prometheus on a free loopback port, its storage in a temporary directory, scraping
    `target_url` (http://127.0.0.1:PORT/metrics) every second; stopped and removed after."""
    binary = prometheus_bin()
    if binary is None:
        raise RuntimeError("Prometheus is not installed (Debian: apt-get install prometheus)")
    target = urlsplit(target_url)
    if target.hostname not in ("127.0.0.1", "localhost"):
        raise ValueError(f"{target_url}: only loopback targets are scraped here")
    root = Path(tempfile.mkdtemp(prefix="oq-prom-"))
    config = root / "prometheus.yml"  # JSON is YAML
    config.write_text(json.dumps(scrape_config(target.netloc, target.path or "/metrics")))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = root / "prometheus.log"
    cmd = [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={root / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    try:
        with serving(cmd, lambda: healthy(f"{url}/-/ready"), log_path, timeout=60, cwd=root):
            yield Prometheus(url)
    finally:
        shutil.rmtree(root, ignore_errors=True)
