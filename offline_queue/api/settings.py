"""What an API server is configured with: store, engine or deployment, limits, and the rights a
key gets when it was created without its own. Its own module, so the routes that read it on
`app.state` and the app that builds them do not import each other."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from offline_queue.states import Tier
from offline_queue.validate import Limits


class ApiSettings(BaseModel):
    db: str
    data_dir: Path
    engine: str | None = None
    """Engine URL or block for local runs."""
    model: str | None = None
    deployment: str | None = None
    """Start batches as runs of this deployment (e.g. route-batch/default) instead of in this
    process (a thread per batch)."""
    files_root: str | None = None
    """Where uploads' bytes go: None keeps them in the store (every node reads them with nothing
    else shared); a directory on a shared mount or an object-storage prefix
    (s3://bucket/uploads) keeps large files out of the database."""
    chunk_size: int = 256
    lease_seconds: float = 60.0
    """Lease of the runs started here: a dead run's batch is reaped after it."""
    limits: Limits = Field(default_factory=Limits)
    max_queued: dict[Tier, int] = Field(
        default_factory=lambda: {
            Tier.CRITICAL: 100_000,
            Tier.STANDARD: 2_000_000,
            Tier.BULK: 10_000_000,
        }
    )
    """Requests waiting per tier (all tenants) before a tenant past its share of the tier gets
    429."""
    max_json_bytes: int = 1 << 20
    """Largest JSON request body."""
    default_tiers: tuple[Tier, ...] = (Tier.STANDARD, Tier.BULK)
    """Tiers of a key created without --tiers."""
    default_max_weight: int = 10
    """Weight cap of a key without one."""
    default_max_waiting: int = 1_000_000
    """Requests a tenant may have waiting, all tiers."""
    default_max_stored_bytes: int = 50 << 30
    """Bytes a tenant's uploaded files may hold."""
    docs: bool = False
    """Serve /docs, /redoc, /openapi.json (with a key)."""
    access_log: Path | None = None
    """Access log file; default stderr."""
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0
    """GET /metrics (Prometheus) on a listener of its own at metrics_host:metrics_port, open
    while the app runs: never on the API's port, where a tenant would read every tenant's
    figures. 0: no listener (`api serve` asks for 9464 unless told)."""

    model_config = ConfigDict(arbitrary_types_allowed=True, use_attribute_docstrings=True)
