"""The gray-release router's entrypoint (prefect.yaml: `flows/release.py:route_batch`).

The flow itself is offline_queue/flows/release.py, installed with the package; this file is
what `prefect deploy` and a deployment's run load by path from the project's directory."""

from offline_queue.flows.release import route_batch

__all__ = ["route_batch"]
