"""The batch deployments' entrypoint (prefect.yaml: `flows/batch.py:batch_inference`).

The flow itself is offline_queue/flows/batch.py, installed with the package; this file is
what `prefect deploy` and a deployment's run load by path from the project's directory."""

from offline_queue.flows.batch import batch_inference

__all__ = ["batch_inference"]
