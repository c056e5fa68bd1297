"""The front doors: the `offline-queue` CLI and the OpenAI-compatible HTTP API.

They live outside the domain package because they start Prefect flows and deployments and read
Prefect blocks; `offline_queue/` itself imports none of that."""
