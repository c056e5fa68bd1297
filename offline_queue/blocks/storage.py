"""The object-storage block: credentials and options for `s3://`, `gs://`, `az://` locations,
kept secret in Prefect, so a deployment that reads or writes a data lake needs nothing in its
workers' environment."""

from __future__ import annotations

import json
import os
from typing import Any, cast

from prefect.blocks.core import Block
from pydantic import ConfigDict, SecretStr

from offline_queue.storage import OPTIONS_VAR


class ObjectStorage(Block):
    """fsspec options for one protocol — for S3 `key`, `secret`, `endpoint_url` (MinIO, Ceph…),
    `client_kwargs`. A run that names the block has them for its input and outputs; without a
    block, credentials come from where the library looks (the environment, ~/.aws, instance
    roles)."""

    _block_type_name = "offline-queue object storage"
    _block_type_slug = "offline-queue-storage"
    _description = "Credentials and fsspec options for object-storage locations (s3://…)."

    model_config = ConfigDict(use_attribute_docstrings=True)

    protocol: str = "s3"
    """The URL scheme these options are for."""
    options: SecretStr
    """fsspec options as JSON, e.g. {"key": "…", "secret": "…", "endpoint_url":
    "http://minio:9000"}: secret, as they hold credentials."""

    def apply(self) -> None:
        """Make the options this process's (and its ingest child's) for `protocol`, over what
        OFFLINE_QUEUE_STORAGE_OPTIONS already says for other protocols."""
        mine = json.loads(self.options.get_secret_value())
        if not isinstance(mine, dict):
            raise ValueError("options: a JSON object of fsspec options")
        current: dict[str, Any] = json.loads(os.environ.get(OPTIONS_VAR) or "{}")
        current[self.protocol] = mine
        os.environ[OPTIONS_VAR] = json.dumps(current)


def use_storage(name: str | None) -> None:
    """Apply the named object-storage block, if a run names one."""
    if name:
        cast(ObjectStorage, ObjectStorage.load(name)).apply()
