"""The HTTP front door: OpenAI's /v1/files and /v1/batches."""
