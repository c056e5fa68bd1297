"""A Prometheus server of our own on loopback, scraping one loopback target every second (a
metrics listener's /metrics) and evaluating alert rules on it, for tests that check what an
operator would see: the real scraper, the real PromQL engine and the real rule evaluation on our
/metrics, not a parser of its text. And Debian's promtool, which checks and unit-tests rules."""

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


def _debian_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found is None and Path(f"/usr/bin/{name}").is_file():  # PATH without /usr/bin
        found = f"/usr/bin/{name}"
    return found


def prometheus_bin() -> str | None:
    """Debian's `prometheus` (`make test` installs it when it can), or None."""
    return _debian_bin("prometheus")


def promtool_bin() -> str | None:
    """Debian's `promtool`, of the same package: it checks and unit-tests rule files; or None."""
    return _debian_bin("promtool")


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

    def rules(self) -> list[dict[str, object]]:
        """Every rule loaded, as /api/v1/rules shows it: its name, health, lastError, state."""
        answer = httpx.get(f"{self.url}/api/v1/rules", timeout=10).json()
        return [rule for group in answer["data"]["groups"] for rule in group["rules"]]

    def value(self, expr: str) -> float | None:
        """The value of a query that yields at most one series; None when it yields none."""
        samples = self.query(expr)
        if len(samples) > 1:
            raise QueryError(f"{expr!r}: {len(samples)} series, expected at most one")
        return samples[0][1] if samples else None


def scrape_config(target: str, metrics_path: str, rules: Path | None = None) -> dict[str, object]:
    return {
        "rule_files": [str(rules)] if rules is not None else [],
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
def prometheus(target_url: str, rules: Path | None = None) -> Iterator[Prometheus]:
    """Prometheus on a free loopback port, its storage in a temporary directory, scraping
    `target_url` (a metrics listener's http://127.0.0.1:PORT/metrics) every second and
    evaluating the `rules` file on it as often; stopped and removed after."""
    binary = prometheus_bin()
    if binary is None:
        raise RuntimeError("Prometheus is not installed (Debian: apt-get install prometheus)")
    target = urlsplit(target_url)
    if target.hostname not in ("127.0.0.1", "localhost"):
        raise ValueError(f"{target_url}: only loopback targets are scraped here")
    root = Path(tempfile.mkdtemp(prefix="oq-prom-"))
    config = root / "prometheus.yml"  # JSON is YAML
    config.write_text(json.dumps(scrape_config(target.netloc, target.path or "/metrics", rules)))
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
