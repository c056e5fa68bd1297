"""What a batch run is given: one model of its parameters, built and validated by every front door
(the CLI's `run`, the API, the release router) and received by the batch flow, which takes them
as flat parameters, as Prefect's deployments and forms need; a test keeps the two in step.
(docs/ARCHITECTURE.md, Why the parts are as they are)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict

from offline_queue.findings import FileInfo
from offline_queue.states import Tier

F = TypeVar("F", bound=Callable[..., Any])


class BatchRun(BaseModel):
    """One run of one batch file: where the file and its results are, which engine serves it,
    its place in the queue, and how hard it tries."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    input: str
    """The OpenAI Batch JSONL file: a path, an object-storage URL (s3://bucket/key; gs://, az://
    with their extras), or store://<file id> for a file in the store."""
    output: str | None = None
    """Output file (a path or URL). Default: <input>.output.jsonl next to the input."""
    errors: str | None = None
    """Error file (a path or URL). Default: <input>.errors.jsonl next to the input."""
    tier: Tier = Tier.STANDARD
    """Priority tier: critical, standard or bulk."""
    weight: int = 1
    """Share of the GPUs within the tier: weights 1:3 get 1:3 of the requests while both have
    work (1 to 1000)."""
    engine: str | None = None
    """Engine block name (e.g. `vllm/a100`) or server URL: it serves the file as it is. Empty (and
    no model): the served-model catalog routes the batch by the model its lines name, and a line
    naming another model, or none served, is an error."""
    model: str | None = None
    """Model folder for the in-process engine (or, with a server, the served name to ask for).
    Empty: the catalog's entry for the model the lines name."""
    chunk_size: int = 256
    """Requests per claim, when this process serves the batch with a loop of its own (a node's
    loops claim chunks of their own size). Larger chunks cost less orchestration; a loop killed
    mid-chunk wastes the chunks it held."""
    max_attempts: int = 3
    """Tries per request before it is terminated: retriable failures, and workers that died or lost
    the lease while it ran (then `worker_lost`)."""
    idempotency_key: str | None = None
    """The same key again resumes the same batch instead of a new one."""
    batch_id: str | None = None
    """Explicit batch id. Default: derived from the file's content."""
    db: str | None = None
    """Store URL (postgresql+psycopg://... or sqlite:///...). Default: the `store` block, else
    OFFLINE_QUEUE_DB, else a SQLite file in the user's data directory."""
    store: str | None = None
    """Name of an offline-queue-store block holding the store URL (as a secret), e.g. `default` as
    `offline-queue pools apply --db` saves it."""
    storage: str | None = None
    """Name of an offline-queue-storage block: credentials and options for an object-storage input
    or output (s3://…). Empty: the environment's."""
    tenant: str | None = None
    """Who the batch is for: a tag on the run, and the key a gray release routes by."""
    metadata: dict[str, str] | None = None
    """Free-form labels kept on the batch object (OpenAI's `metadata`)."""
    release_track: str | None = None
    """Set by the release router: `stable` or `candidate`."""
    release_version: str | None = None
    """Set by the release router: the model version of that track."""
    lease_seconds: float = 60.0
    """A dead worker's chunk is claimed again after this long; the lease is renewed every third of
    it while the worker lives."""
    inspected: FileInfo | None = None
    """What a look at the input already found (hash, size, lines, the models they name), when the
    caller has looked (`offline-queue run`): the flow then reads the file only to queue it."""

    def parameters(self) -> dict[str, Any]:
        """The flow parameters this run chose: the fields given, without the empty ones.

        What is left out takes the flow's default — or, for a run of a deployment, the
        deployment's (prefect.yaml's `parameters:`): a front door that did not choose an engine
        or a chunk size must not override the one the deployment was given.
        """
        return self.model_dump(mode="json", exclude_unset=True, exclude_none=True)


def one_line(text: str | None) -> str:
    """A field's description as one line: an attribute docstring keeps its line breaks, and an
    `Args:` entry of a Google docstring ends at the first line that is not indented under it."""
    return " ".join((text or "").split())


def with_field_docs(fn: F) -> F:
    """Give `fn` (whose parameters are BatchRun's fields) an `Args:` section made of the
    fields' descriptions. Prefect shows a flow parameter's description — in the UI's run form,
    in the deployment's schema — from the flow's docstring, Google style; so each description
    is written once, on its field."""
    lines = [
        f"        {name}: {one_line(field.description)}"
        for name, field in BatchRun.model_fields.items()
    ]
    fn.__doc__ = f"{fn.__doc__ or ''}\n    Args:\n" + "\n".join(lines) + "\n"
    return fn
