"""What an API server is configured with: store, engine or deployment, limits, and the rights a
key gets when it was created without its own. Its own module, so the routes that read it on
`app.state` and the app that builds them do not import each other."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from offline_queue.states import Tier
from offline_queue.validate import Limits


class ApiSettings(BaseModel):
    db: str
    data_dir: Path
    engine: str | None = Field(default=None, description="Engine URL or block for local runs.")
    model: str | None = None
    deployment: str | None = Field(
        default=None,
        description="Start batches as runs of this deployment (e.g. route-batch/default) "
        "instead of in this process (a thread per batch).",
    )
    files_root: str | None = Field(
        default=None,
        description="Where uploads' bytes go: None keeps them in the store (every node reads "
        "them with nothing else shared); a directory on a shared mount or an object-storage "
        "prefix (s3://bucket/uploads) keeps large files out of the database.",
    )
    chunk_size: int = 256
    lease_seconds: float = Field(
        default=60.0,
        description="Lease of the runs started here: a dead run's batch is reaped after it.",
    )
    limits: Limits = Field(default_factory=Limits)
    max_queued: dict[Tier, int] = Field(
        default_factory=lambda: {
            Tier.CRITICAL: 100_000,
            Tier.STANDARD: 2_000_000,
            Tier.BULK: 10_000_000,
        },
        description="Requests waiting per tier (all tenants) before a tenant past its share of "
        "the tier gets 429.",
    )
    max_json_bytes: int = Field(default=1 << 20, description="Largest JSON request body.")
    default_tiers: tuple[Tier, ...] = Field(
        default=(Tier.STANDARD, Tier.BULK), description="Tiers of a key created without --tiers."
    )
    default_max_weight: int = Field(default=10, description="Weight cap of a key without one.")
    default_max_waiting: int = Field(
        default=1_000_000, description="Requests a tenant may have waiting, all tiers."
    )
    default_max_stored_bytes: int = Field(
        default=50 << 30, description="Bytes a tenant's uploaded files may hold."
    )
    docs: bool = Field(
        default=False, description="Serve /docs, /redoc, /openapi.json (with a key)."
    )
    access_log: Path | None = Field(default=None, description="Access log file; default stderr.")
    metrics: bool = Field(
        default=True,
        description="Serve GET /metrics (Prometheus) without a key, like /health: it shows "
        "counts per tier and tenant, no content. Off: no /metrics route at all.",
    )

    model_config = {"arbitrary_types_allowed": True}
