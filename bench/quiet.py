"""Imported first by a benchmark that runs the flow in its own process (before Prefect or vLLM
is): no analytics, room for the temporary Prefect server's slow start on a loaded machine, and
warnings only, so the figures are what the log shows."""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
