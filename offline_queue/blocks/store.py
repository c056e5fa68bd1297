"""The store block: where batches, requests and results live, with the URL kept secret."""

from __future__ import annotations

from typing import cast

from prefect.blocks.core import Block
from pydantic import ConfigDict, SecretStr

from offline_queue.store.db import resolve_url


class Store(Block):
    """The offline-queue store. PostgreSQL for a cluster (every worker claims from it);
    SQLite only for one machine (one writer at a time)."""

    _block_type_name = "offline-queue store"
    _block_type_slug = "offline-queue-store"
    _description = (
        "Database URL of the offline-queue store (postgresql+psycopg://… or sqlite:///…)."
    )

    model_config = ConfigDict(use_attribute_docstrings=True)

    url: SecretStr
    """SQLAlchemy URL, e.g. postgresql+psycopg://user:pw@db/oq."""

    def get_url(self) -> str:
        return self.url.get_secret_value()


def store_url(db: str | None, store: str | None) -> str:
    """The store a flow run uses: an explicit URL, else the named store block, else the
    process default (OFFLINE_QUEUE_DB or the SQLite file)."""
    return resolve_url(db or (cast(Store, Store.load(store)).get_url() if store else None))
