"""A cluster's pools and deployments, as a test or a benchmark on simulated nodes sets them up:
`offline-queue pools apply` of a topology, then the batch flow deployed once per group and tier
(the deployment names prefect.yaml gives)."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from instruments.processes import BIN

REPO = Path(__file__).resolve().parents[1]


def apply_pools(topology: Mapping[str, Any], folder: Path, store: str, env: dict[str, str]) -> Path:
    """`topology` (pools.yaml's shape) written to `folder` and applied against `store`, with
    the Prefect server `env` names; the file written (what `worker start --file` reads)."""
    pools = folder / "pools.yaml"
    pools.write_text(yaml.safe_dump(dict(topology)))
    applied = subprocess.run(
        [str(BIN / "offline-queue"), "pools", "apply", str(pools), "--db", store],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert applied.returncode == 0, applied.stderr[-2000:]
    return pools


def deploy_tiers(topology: Mapping[str, Any], **parameters: object) -> None:
    """One deployment of the batch flow from this checkout per group and tier, `{group}-{tier}`
    on the group's pool at the tier's queue, with `parameters` and the tier. Against the
    Prefect API the caller has set."""
    from prefect import Flow

    from offline_queue.flows.batch import batch_inference

    source = batch_inference.from_source(str(REPO), "flows/batch.py:batch_inference")
    assert isinstance(source, Flow)  # sync: not a coroutine
    for group in topology["groups"]:
        for tier in topology["tiers"]:
            source.deploy(
                name=f"{group}-{tier}",
                work_pool_name=group,
                work_queue_name=tier,
                parameters={"tier": tier, **parameters},
                print_next_steps=False,
            )
