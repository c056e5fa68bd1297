"""Served-model blocks: the catalog entries an operator adds beside the two bundled models — one
block per model name, saying which engine serves it — and the catalog a batch is routed by."""

from __future__ import annotations

import logging

from prefect.blocks.core import Block
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError
from pydantic import ConfigDict, Field

from offline_queue.catalog import DEFAULT_CATALOG, Catalog, ServedModel
from offline_queue.formats import GENERATE_URLS

log = logging.getLogger(__name__)


class ServedModelBlock(Block):
    """A model name batches may give, and what serves it (offline_queue/catalog.py)."""

    _block_type_name = "Served model"
    _block_type_slug = "served-model"
    _description = "A model name the lines of a batch may name, and the engine that serves it."

    model_config = ConfigDict(use_attribute_docstrings=True)

    name: str = Field(min_length=1)
    """The name lines give as `model`."""
    aliases: list[str] = Field(default_factory=list)
    """Other names that mean this model (e.g. a hosted model's name, so a batch written for it runs
    here unchanged)."""
    endpoints: list[str] = Field(default_factory=lambda: list(GENERATE_URLS))
    """What it serves, of /v1/chat/completions, /v1/completions, /v1/responses and
    /v1/embeddings: a chat model serves the first three, an embedding model /v1/embeddings."""
    engine: str | None = None
    """Engine block (`openai-server/gpu-a100`, `vllm/cpu-local`) or server URL. Empty: vLLM in the
    worker process with `model`."""
    model: str | None = None
    """In process: the model folder (or a bundled model's name). For a server: the served model
    name to ask for. Empty: the bundled chat model / the server's first."""
    group: str | None = None
    """Node group that serves it."""
    release: str | None = None
    """Release policy picking its version."""

    def entry(self) -> ServedModel:
        return ServedModel(
            name=self.name,
            aliases=tuple(self.aliases),
            endpoints=tuple(self.endpoints),
            engine=self.engine,
            model=self.model,
            group=self.group,
            release=self.release,
        )


def catalog_here() -> Catalog:
    """The catalog for a command or the API to show: `load_catalog` when a Prefect server is
    configured, else the bundled models (starting a temporary server to read no blocks costs
    10-20 s)."""
    from prefect.settings import PREFECT_API_URL

    return load_catalog() if PREFECT_API_URL.value() else DEFAULT_CATALOG


def load_catalog() -> Catalog:
    """The bundled models and every saved served-model block (one of the same name replaces a
    bundled one). Read when a batch is routed; the batch keeps what it saw."""
    try:
        with get_client(sync_client=True) as client:
            documents = client.read_block_documents_by_type(ServedModelBlock.get_block_type_slug())
    except (ObjectNotFound, PrefectHTTPStatusError) as exc:
        if isinstance(exc, PrefectHTTPStatusError) and exc.response.status_code != 404:
            raise
        return DEFAULT_CATALOG  # the block type was never registered: no entries of ours
    entries = [ServedModelBlock._from_block_document(d).entry() for d in documents]
    return DEFAULT_CATALOG.with_entries(entries)
