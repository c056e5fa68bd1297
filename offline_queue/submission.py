"""What a new batch is created with, whoever submits it: a run's submit task (a file placed by
offline_queue/batches.place_batch) or the API's admission (an uploaded file). One record, so both
start the row the same way (store/batches.new_batch) and nobody lists its fields again; the field
names are the batch row's column names, and the row is built from them by name.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from offline_queue.states import Tier


@dataclass(frozen=True)
class Submission:
    id: str
    content_hash: str
    """The file's sha256: the same id with other content is a conflict, never a resume."""
    input_path: str
    output_path: str
    error_path: str
    tier: str = Tier.STANDARD
    weight: int = 1
    max_attempts: int = 3
    metadata: dict[str, str] | None = None
    idempotency_key: str | None = None
    """The same key again (the same tenant's, or one of runs without a tenant) is this batch."""
    tenant: str | None = None
    """The API tenant that owns it; None for a batch run from the CLI or a deployment."""
    input_file_id: str | None = None
    endpoint: str | None = None
    total_lines: int = 0
    """Known up front for an uploaded file (counted at upload); a run's file counts at ingest."""
    completion_window: str | None = None
    """OpenAI's window (`24h`): only the API's batches have one, and expire at its end."""

    def columns(self) -> dict[str, Any]:
        """The fields that are the row's columns as they are (`metadata` is stored as JSON)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "metadata"}
