"""offline-queue: batch LLM inference on your own GPUs. OpenAI Batch JSONL in, exactly one result
per request out; docs/ARCHITECTURE.md says where each part lives."""
