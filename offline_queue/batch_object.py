"""The batch object: OpenAI's, as /v1/batches returns it, with our extra fields (where the
files are, what a run did, its route, GPU time, the finish estimate) — the output side of the wire
formats, beside formats.py's request lines."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from offline_queue.states import BatchStatus


class LineError(BaseModel):
    code: str
    message: str
    line: int | None = None


class RequestCounts(BaseModel):
    total: int = 0
    completed: int = 0
    failed: int = 0


class Usage(BaseModel):
    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[LineError] = Field(default_factory=list)


class RunStats(BaseModel):
    """What one invocation did: sent to the engine, or took from earlier work (resume, cache)."""

    inferred: int = 0
    reused: int = 0


class FinishEstimate(BaseModel):
    """When an unfinished batch is expected to finish (offline_queue/eta.py) — our extra field
    on the batch object, on a single batch's read while an estimate exists."""

    finish_at: int
    """Epoch seconds."""
    late: bool
    """The estimate passes the batch's `expires_at`: what is not done by then is dropped."""
    requests_per_second: float
    requests_ahead: int
    """Requests counted before the batch's own: more urgent tiers (and, for a batch not yet
    served, earlier batches of its tier)."""


class BatchObject(BaseModel):
    """OpenAI's batch object, plus where the files are on disk and what this run did."""

    id: str
    object: Literal["batch"] = "batch"
    endpoint: str | None
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str | None = "24h"
    """None for a batch run from the CLI: it has no window and never expires."""
    status: BatchStatus
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts
    metadata: dict[str, str] | None = None
    usage: Usage = Field(default_factory=Usage)
    # Our extra fields, after OpenAI's.
    model_version: str | None = None
    """The model version that served it (what a gray release routes and compares by)."""
    input_file: str | None = None
    """Where its lines were read from: a path, an object-storage URL or store://FILE_ID."""
    output_file: str | None = None
    """Where the outputs are, once it has finished (store://… for the API's: its rows)."""
    error_file: str | None = None
    run: RunStats | None = None
    """What the run that returns it did (the flow's result); None in a read from the store."""
    route: str | None = None
    """The engine it runs on: the serving loops of this route claim its chunks."""
    waiting_reason: str | None = None
    """Why it waits with nobody serving it (no live serving loop on its route), while it does."""
    engine_seconds: float = 0.0
    """GPU time the batch used so far, in engine-seconds (offline_queue/gpu_time.py) — our extra
    field: what a team that owns its GPUs bills a tenant by."""
    estimate: FinishEstimate | None = None
